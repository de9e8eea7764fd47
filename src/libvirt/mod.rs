//! The libvirt layer: the one seam between CPI handlers and the hypervisor.
//!
//! It opens the connection (our own error handling, keepalive on), and turns
//! every libvirt failure into a `CloudError` that says what was being done and
//! libvirt's reason. "Not found" is a value here (`Option`), never an error;
//! handlers decide which BOSH type it becomes.

pub mod disk;
pub mod domain;
pub mod network;
pub mod pool;
pub mod stemcell;
pub mod upload;
pub mod volume;
pub mod xmltree;

pub use pool::xml_escape;

use std::sync::Once;

use virt::connect::Connect;
use virt::error::{ErrorDomain, ErrorNumber};

use crate::error::{CpiError, Result};

pub struct Libvirt {
    conn: Option<Connect>,
    uri: String,
}

static INIT: Once = Once::new();

const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// libvirt's default handler prints every error to stderr; we report errors
/// ourselves. Keepalive needs an event loop, which runs on a background thread
/// for the life of the process.
fn init_process() {
    INIT.call_once(|| {
        virt::error::clear_error_callback();
        if virt::event::event_register_default_impl().is_ok() {
            std::thread::spawn(|| loop {
                if virt::event::event_run_default_impl().is_err() {
                    break;
                }
            });
        }
    });
}

impl Libvirt {
    /// Connects, giving up after `CONNECT_TIMEOUT`: libvirt's own open has
    /// no limit, and a frozen libvirtd would hold the director, which waits
    /// for a CPI without one, forever. (Once open, keepalive ends a call to a
    /// libvirtd that stopped answering within about 30 s.)
    pub fn open(uri: &str) -> Result<Libvirt> {
        init_process();
        let (tx, rx) = std::sync::mpsc::channel();
        let target = uri.to_string();
        std::thread::spawn(move || {
            let _ = tx.send(Connect::open(Some(&target)));
        });
        let opened = rx.recv_timeout(CONNECT_TIMEOUT).map_err(|_| {
            CpiError::cloud(format!(
                "connecting to libvirt at {uri}: no answer within {} s (is libvirtd frozen or overloaded?)",
                CONNECT_TIMEOUT.as_secs()
            ))
            .retryable(true)
        })?;
        let conn = opened.map_err(|e| {
            let hint = connect_hint(e.message());
            let mut error = lv_error(format!("connecting to libvirt at {uri}"), e);
            error.message.push_str(hint);
            error
        })?;
        // Local drivers have no keepalive; a remote one that refuses it still works.
        let _ = conn.set_keep_alive(5, 6);
        Ok(Libvirt {
            conn: Some(conn),
            uri: uri.to_string(),
        })
    }

    pub fn conn(&self) -> &Connect {
        // Only `drop` takes the connection out.
        self.conn
            .as_ref()
            .expect("libvirt connection is open until drop")
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        // virt's own Drop panics when close fails; a closing connection that
        // errors is of no interest to a process that is about to exit.
        if let Some(conn) = self.conn.take() {
            unsafe {
                virt::sys::virConnectClose(conn.as_ptr());
            }
            std::mem::forget(conn);
        }
    }
}

/// libvirt's TLS failures are terse; say what usually causes them.
fn connect_hint(message: &str) -> &'static str {
    if message.contains("TLS confirmation") {
        " (libvirtd refused this client's certificate: clientcert.pem/clientkey.pem under pkipath must be issued by a CA that libvirtd trusts)"
    } else if message.contains("certificate") && message.contains("failed validation") {
        " (the client certificate is not issued by the CA in pkipath's cacert.pem)"
    } else if message.contains("Cannot read") && message.contains(".pem") {
        " (pkipath must hold cacert.pem, clientcert.pem and clientkey.pem)"
    } else if message.contains("Connection refused") {
        " (is libvirtd listening for TLS on port 16514 of that host?)"
    } else {
        ""
    }
}

/// Turns a libvirt error into a `CloudError` naming what was being done.
/// `ok_to_retry` is set when the failure is of a kind a retry may cure: the
/// connection to libvirtd was lost or timed out (anything the RPC layer
/// reports), a busy resource, a name clash with a concurrent caller.
pub fn lv_error(doing: impl std::fmt::Display, e: virt::error::Error) -> CpiError {
    let transient = e.domain().is_known_and(|d| d == ErrorDomain::Rpc)
        || e.code().is_known_and(|c| {
            matches!(
                c,
                ErrorNumber::Rpc
                    | ErrorNumber::NoConnect
                    | ErrorNumber::OperationTimeout
                    | ErrorNumber::OperationAborted
                    | ErrorNumber::ResourceBusy
                    | ErrorNumber::AgentUnresponsive
                    | ErrorNumber::StorageVolExist
                    | ErrorNumber::DomExist
            )
        });
    CpiError::cloud(format!("{doing}: {}", e.message())).retryable(transient)
}

/// Maps "no such object" errors to `None`, everything else to a `CloudError`.
pub fn not_found_as_none<T>(
    r: std::result::Result<T, virt::error::Error>,
    doing: impl std::fmt::Display,
) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(lv_error(doing, e)),
    }
}

pub fn is_not_found(e: &virt::error::Error) -> bool {
    e.code().is_known_and(|c| {
        matches!(
            c,
            ErrorNumber::NoDomain
                | ErrorNumber::NoStorageVolume
                | ErrorNumber::NoStoragePool
                | ErrorNumber::NoNetwork
                | ErrorNumber::NoDomainMetadata
        )
    })
}
