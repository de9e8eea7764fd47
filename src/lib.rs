//! A BOSH Cloud Provider Interface (API v2) for libvirt/KVM.
//!
//! One process per CPI call: `run` turns the raw request bytes into exactly one
//! response, whatever happens (bad input, bad config, libvirt failure, panic).

pub mod check;
pub mod config;
pub mod configdrive;
pub mod creator;
pub mod envelope;
pub mod error;
pub mod handlers;
pub mod host;
pub mod image;
pub mod iso9660;
pub mod libvirt;
pub mod log;
pub mod method;
pub mod names;
pub mod net;
pub mod records;
pub mod settings;
pub mod uri;
pub mod vm_spec;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use serde_json::Value;

use crate::config::Config;
use crate::envelope::{parse_request, Request, Response};
use crate::error::CpiError;
use crate::handlers::{dispatch, Call};
use crate::log::Logger;
use crate::method::Method;

/// Handles one request completely (the `cpi-libvirt` executable). Never
/// panics; never returns without a response.
/// `started`: when the front process started (see log::STARTED_ENV).
pub fn run(
    config_path: Option<&Path>,
    input: std::io::Result<Vec<u8>>,
    started: Option<std::time::SystemTime>,
) -> Response {
    let mut log = Logger::new(None, "-").started_at(started);
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let (request, config, method) = prepare(config_path, input, &mut log)?;
        let mut call = Call::new(&config, &mut log, &request);
        dispatch(method, &mut call)
    }));
    respond(outcome, log)
}

/// What the front process (`cpi`) does with a request.
pub enum Front {
    /// Answered without libvirt: `info`, or an error found before libvirt is needed.
    Respond(Response),
    /// Valid, and needs libvirt: hand the same bytes to `cpi-libvirt`, with
    /// the time this process started (log::STARTED_ENV).
    Handoff { started_ns: u128 },
}

/// Everything that needs no libvirt, so the front executable does not link
/// it: loading libvirt's 55 shared libraries costs about 11 ms, and callers
/// run `info` before nearly every method.
pub fn front(config_path: Option<&Path>, input: std::io::Result<Vec<u8>>) -> Front {
    let mut log = Logger::new(None, "-");
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        prepare(config_path, input, &mut log).map(|(_, config, method)| match method {
            Method::Info => Some(handlers::info::info(&config)),
            _ => None,
        })
    }));
    match outcome {
        Ok(Ok(None)) => {
            log.debug("start (handing over to cpi-libvirt)");
            Front::Handoff {
                started_ns: log.started_ns(),
            }
        }
        Ok(Ok(Some(result))) => Front::Respond(respond(Ok(result), log)),
        Ok(Err(e)) => Front::Respond(respond(Ok(Err(e)), log)),
        Err(panic) => Front::Respond(respond(Err(panic), log)),
    }
}

/// Parses the request, loads the config (with the context's overrides) and
/// types the method: every check that needs no libvirt.
fn prepare(
    config_path: Option<&Path>,
    input: std::io::Result<Vec<u8>>,
    log: &mut Logger,
) -> Result<(Request, Config, Method), CpiError> {
    let bytes = input.map_err(|e| CpiError::bad_request(format!("reading stdin: {e}")))?;
    let request = parse_request(&bytes)?;
    *log = log.for_request(request.request_id(), &request.method);
    let config = Config::load(config_path, &request.context)?;
    log.set_level(config.log_level);
    let method = Method::parse(&request.method, &request.arguments)?;
    Ok((request, config, method))
}

type Outcome = std::thread::Result<Result<Value, CpiError>>;

fn respond(outcome: Outcome, mut log: Logger) -> Response {
    let (result, error) = match outcome {
        Ok(Ok(value)) => (value, None),
        Ok(Err(e)) => (Value::Null, Some(e)),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            (
                Value::Null,
                Some(CpiError::cloud(format!("internal error (panic): {what}"))),
            )
        }
    };
    // One completion line per call, with its outcome and the whole
    // process's time; a summary in `log` for every call that succeeds.
    match &error {
        Some(e) => log.error(format!(
            "failed after {} ms: {} {}",
            log.elapsed_ms(),
            e.kind.bosh_type(),
            e.message
        )),
        None => {
            if !log.has_summary() {
                log.summary(format!("result: {}", short(&result)));
            }
            log.info(format!("done in {} ms", log.elapsed_ms()));
        }
    }
    Response {
        result,
        error,
        log: log.take_summary(),
    }
}

/// A result as one short line for the summary.
fn short(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(200) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_cloud_error_response() {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let outcome: Outcome = catch_unwind(|| -> Result<Value, CpiError> { panic!("boom") });
        std::panic::set_hook(prev);
        let r = respond(outcome, Logger::new(Some("cpi-1"), "test"));
        let e = r.error.clone().expect("an error");
        assert_eq!(e.kind, crate::error::ErrorKind::CloudError);
        assert_eq!(e.message, "internal error (panic): boom");
        assert_eq!(r.to_json()["result"], Value::Null);
    }
}
