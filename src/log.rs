//! Logging for operators: one line per event on stderr (the director streams it
//! into the task's CPI log), tagged with the request id, plus a short summary
//! that goes into the response's `log` field.
//!
//! Callers must never pass secrets (agent env, settings, keys) to the logger.

use std::fmt;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::LogLevel;

pub struct Logger {
    request_id: String,
    method: String,
    level: LogLevel,
    summary: String,
    started: SystemTime,
}

/// The front executable hands the time its process started to `cpi-libvirt`
/// in this variable (unix nanoseconds), so a call's duration counts the
/// whole process, loading libvirt included.
pub const STARTED_ENV: &str = "LIBVIRT_CPI_STARTED_NS";

impl Logger {
    pub fn new(request_id: Option<&str>, method: &str) -> Self {
        Logger {
            request_id: request_id.unwrap_or("-").to_string(),
            method: method.to_string(),
            level: LogLevel::Info,
            summary: String::new(),
            started: SystemTime::now(),
        }
    }

    /// The same logger for the request once it is parsed (the start time kept).
    pub fn for_request(&self, request_id: Option<&str>, method: &str) -> Self {
        Logger {
            started: self.started,
            ..Logger::new(request_id, method)
        }
    }

    /// Counts the call's time from `started` (see STARTED_ENV) when given.
    pub fn started_at(mut self, started: Option<SystemTime>) -> Self {
        if let Some(t) = started.filter(|t| *t <= self.started) {
            self.started = t;
        }
        self
    }

    /// Milliseconds since the call started.
    pub fn elapsed_ms(&self) -> u128 {
        self.started.elapsed().map_or(0, |d| d.as_millis())
    }

    /// `started` as STARTED_ENV carries it.
    pub fn started_ns(&self) -> u128 {
        self.started
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    }

    pub fn has_summary(&self) -> bool {
        !self.summary.is_empty()
    }

    pub fn set_level(&mut self, level: LogLevel) {
        self.level = level;
    }

    pub fn debug(&mut self, message: impl fmt::Display) {
        self.emit(LogLevel::Debug, &message.to_string());
    }

    pub fn info(&mut self, message: impl fmt::Display) {
        self.emit(LogLevel::Info, &message.to_string());
    }

    pub fn warn(&mut self, message: impl fmt::Display) {
        self.emit(LogLevel::Warn, &message.to_string());
    }

    pub fn error(&mut self, message: impl fmt::Display) {
        self.emit(LogLevel::Error, &message.to_string());
    }

    /// A warning the operator must see: on stderr and in the response's
    /// `log` (which the director keeps in the task's debug log).
    pub fn warning(&mut self, message: impl fmt::Display) {
        let message = message.to_string();
        self.emit(LogLevel::Warn, &message);
        self.summary.push_str("WARNING: ");
        self.summary.push_str(&message);
        self.summary.push('\n');
    }

    /// Info lines also go into the response's `log` summary.
    pub fn summary(&mut self, message: impl fmt::Display) {
        let message = message.to_string();
        self.emit(LogLevel::Info, &message);
        self.summary.push_str(&message);
        self.summary.push('\n');
    }

    pub fn take_summary(&mut self) -> String {
        std::mem::take(&mut self.summary)
    }

    fn emit(&mut self, level: LogLevel, message: &str) {
        if level < self.level {
            return;
        }
        let tag = match level {
            LogLevel::Debug => "DEBUG",
            LogLevel::Info => "INFO",
            LogLevel::Warn => "WARN",
            LogLevel::Error => "ERROR",
        };
        // One write per line so concurrent CPIs sharing a stderr do not interleave.
        let line = format!(
            "{} {tag} [{}] {}: {}\n",
            timestamp(),
            self.request_id,
            self.method,
            message.replace('\n', " | ")
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

/// RFC 3339 UTC with milliseconds, without a date crate.
pub fn timestamp() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_779), (2026, 11, 22));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
