//! `cpi <config.json>`: one JSON request on stdin, one JSON response on stdout,
//! exit 0 (a non-zero exit only when even the response could not be written).
//!
//! This front executable does not link libvirt, so `info` and malformed
//! requests are answered in about a millisecond. Requests that need libvirt
//! are handed, bytes unchanged, to the `cpi-libvirt` executable beside it,
//! which replaces this process (same pid, same stdout and stderr).
//!
//! `cpi check [--json] <config.json>` is the operator's host check
//! (`libvirt_cpi::check`); it needs libvirt, so it is `cpi-libvirt`'s too.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use libvirt_cpi::envelope::Response;
use libvirt_cpi::error::CpiError;
use libvirt_cpi::Front;

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == "check") {
        let e = std::env::current_exe().map(|exe| {
            Command::new(exe.with_file_name("cpi-libvirt"))
                .args(&args)
                .exec()
        });
        eprintln!(
            "cpi check: running cpi-libvirt: {}",
            match e {
                Ok(e) => e,
                Err(e) => e,
            }
        );
        return ExitCode::from(2);
    }
    let config_path = std::env::args_os().nth(1).map(PathBuf::from);
    let mut input = Vec::new();
    let read = std::io::stdin().read_to_end(&mut input).map(|_| ());
    let response = match read {
        Err(e) => libvirt_cpi::front(config_path.as_deref(), Err(e)),
        Ok(()) => libvirt_cpi::front(config_path.as_deref(), Ok(input.clone())),
    };
    let response = match response {
        Front::Respond(r) => r,
        Front::Handoff { started_ns } => {
            let e = handoff(config_path.as_deref(), &input, started_ns);
            Response {
                result: serde_json::Value::Null,
                error: Some(e),
                log: String::new(),
            }
        }
    };
    response.write_to_stdout()
}

/// Execs `cpi-libvirt` with the request bytes as its stdin. Returns only on failure.
fn handoff(config_path: Option<&Path>, request: &[u8], started_ns: u128) -> CpiError {
    let worker = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name("cpi-libvirt"),
        Err(e) => return CpiError::cloud(format!("locating the cpi-libvirt executable: {e}")),
    };
    let stdin = match request_as_file(request) {
        Ok(f) => f,
        Err(e) => return CpiError::cloud(format!("passing the request to cpi-libvirt: {e}")),
    };
    let mut cmd = Command::new(&worker);
    if let Some(path) = config_path {
        cmd.arg(path);
    }
    let e = cmd
        .env(libvirt_cpi::log::STARTED_ENV, started_ns.to_string())
        .stdin(Stdio::from(stdin))
        .exec();
    CpiError::cloud(format!("running {}: {e}", worker.display()))
}

/// An anonymous in-memory file holding the request, rewound: any size works,
/// and nothing touches the filesystem.
fn request_as_file(request: &[u8]) -> std::io::Result<std::fs::File> {
    use std::io::{Seek, SeekFrom};
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create takes a NUL-terminated name and returns a new fd we own.
    let fd = unsafe { libc::memfd_create(c"cpi-request".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor owned by nobody else.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(request)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}
