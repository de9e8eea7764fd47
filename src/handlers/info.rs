//! `info`: static data, answered without touching libvirt (callers ask before
//! every single method).

use serde_json::{json, Value};

use crate::config::Config;
use crate::error::Result;

pub const API_VERSION: u64 = 2;

pub fn info(config: &Config) -> Result<Value> {
    Ok(json!({
        "api_version": API_VERSION,
        "stemcell_formats": config.stemcell_formats,
    }))
}
