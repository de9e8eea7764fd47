//! `cpi-libvirt <config.json>`: the half of the CPI that talks to libvirt.
//! The `cpi` front executable execs it for every request that needs libvirt;
//! it reads the same request from stdin and writes the one response.
//! `cpi-libvirt check ...` is the host check (`libvirt_cpi::check`).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == "check") {
        return libvirt_cpi::check::main(&args[1..]);
    }
    let config_path = std::env::args_os().nth(1).map(PathBuf::from);
    let mut input = Vec::new();
    let read = std::io::stdin().read_to_end(&mut input).map(|_| input);
    let started = std::env::var(libvirt_cpi::log::STARTED_ENV)
        .ok()
        .and_then(|ns| ns.parse::<u64>().ok())
        .map(|ns| UNIX_EPOCH + Duration::from_nanos(ns));
    libvirt_cpi::run(config_path.as_deref(), read, started).write_to_stdout()
}
