//! A BOSH Cloud Provider Interface (API v2) for libvirt/KVM.
//!
//! One process per CPI call: `run` turns the raw request bytes into exactly one
//! response, whatever happens (bad input, bad config, libvirt failure, panic).

pub mod cid;
pub mod config;
pub mod envelope;
pub mod error;
pub mod handlers;
pub mod image;
pub mod libvirt;
pub mod log;
pub mod method;
pub mod net;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use serde_json::Value;

use crate::config::Config;
use crate::envelope::{parse_request, Response};
use crate::error::CpiError;
use crate::handlers::{dispatch, Call};
use crate::log::Logger;
use crate::method::Method;

/// Handles one request. Never panics; never returns without a response.
pub fn run(config_path: Option<&Path>, input: std::io::Result<Vec<u8>>) -> Response {
    let mut log = Logger::new(None, "-");
    let outcome = catch_unwind(AssertUnwindSafe(|| handle(config_path, input, &mut log)));
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
    if let Some(e) = &error {
        log.error(format!("{} {}", e.kind.bosh_type(), e.message));
    }
    Response {
        result,
        error,
        log: log.take_summary(),
    }
}

fn handle(
    config_path: Option<&Path>,
    input: std::io::Result<Vec<u8>>,
    log: &mut Logger,
) -> Result<Value, CpiError> {
    let bytes = input.map_err(|e| CpiError::bad_request(format!("reading stdin: {e}")))?;
    let request = parse_request(&bytes)?;
    *log = Logger::new(request.request_id(), &request.method);
    let config = Config::load(config_path, &request.context)?;
    log.set_level(config.log_level);
    let method = Method::parse(&request.method, &request.arguments)?;
    log.debug("start");
    let mut call = Call::new(&config, log, &request);
    dispatch(method, &mut call)
}
