//! The libvirt layer: the one seam between CPI handlers and the hypervisor.
//!
//! It opens the connection (our own error handling, keepalive on), and turns
//! every libvirt failure into a `CloudError` that says what was being done and
//! libvirt's reason. "Not found" is a value here (`Option`), never an error;
//! handlers decide which BOSH type it becomes.

mod copy_lock;
pub mod disk;
pub mod domain;
pub mod host;
pub mod inspect;
pub mod network;
pub mod orphan_nodes;
pub mod pool;
pub mod staging;
pub mod stemcell;
mod stemcell_host;
pub mod upload;
mod vm_host;
pub mod volume;
pub mod xmltree;
pub mod xmlwrite;

use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once};
use std::time::Duration;

use virt::connect::Connect;
use virt::error::{ErrorDomain, ErrorNumber};

use crate::error::{CpiError, Result};
use crate::uri::{LibvirtUri, Transport};

pub struct Libvirt {
    conn: Option<Connect>,
    uri: String,
    /// The staging pool of the pool this process works in, once opened
    /// (`staging`), with the name of that pool.
    staging: std::sync::OnceLock<(String, virt::storage_pool::StoragePool)>,
}

static REGISTER: Once = Once::new();

/// The thread running libvirt's default event loop, shared by every open
/// connection of the process and stopped when the last one is dropped.
struct EventLoop {
    connections: usize,
    stop: Arc<AtomicBool>,
    stopped: mpsc::Receiver<()>,
}

static EVENT_LOOP: Mutex<Option<EventLoop>> = Mutex::new(None);

const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// libvirt's default handler prints every error to stderr; we report errors
/// ourselves. Keepalive needs an event loop, which runs on a background thread
/// while a connection is open.
fn init_process() {
    static REGISTERED: AtomicBool = AtomicBool::new(false);
    REGISTER.call_once(|| {
        virt::error::clear_error_callback();
        REGISTERED.store(
            virt::event::event_register_default_impl().is_ok(),
            Ordering::SeqCst,
        );
    });
    if !REGISTERED.load(Ordering::SeqCst) {
        return;
    }
    let mut state = EVENT_LOOP.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(event_loop) = state.as_mut() {
        event_loop.connections += 1;
        return;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (done, stopped) = mpsc::channel();
    let stop_flag = Arc::clone(&stop);
    std::thread::spawn(move || {
        while !stop_flag.load(Ordering::SeqCst) {
            if virt::event::event_run_default_impl().is_err() {
                break;
            }
        }
        let _ = done.send(());
    });
    *state = Some(EventLoop {
        connections: 1,
        stop,
        stopped,
    });
}

/// Called once a connection is closed. libvirt releases a closed
/// connection's socket on the event loop thread, and for the libssh
/// transports that release still talks to OpenSSL (closing the ssh channel).
/// A process that exits meanwhile tears OpenSSL down under it and dies with
/// SIGSEGV after its response is written (measured: 1 call in 4 over
/// qemu+libssh), which `bosh create-env` takes as a failed call. So the last
/// connection lets the loop run once more, stops it, and waits for it.
fn release_event_loop() {
    let mut state = EVENT_LOOP.lock().unwrap_or_else(|e| e.into_inner());
    let Some(event_loop) = state.as_mut() else {
        return;
    };
    event_loop.connections -= 1;
    if event_loop.connections > 0 {
        return;
    }
    let Some(event_loop) = state.take() else {
        return;
    };
    drop(state);
    event_loop.stop.store(true, Ordering::SeqCst);
    unsafe extern "C" fn wake(timer: c_int, _opaque: *mut c_void) {
        // SAFETY: removes the one-shot timer this callback belongs to.
        unsafe {
            virt::sys::virEventRemoveTimeout(timer);
        }
    }
    // SAFETY: a timer with a plain function and no data; it wakes the loop
    // (so it iterates, releasing what the closed connection left, and sees
    // `stop`) and removes itself when it fires.
    unsafe {
        virt::sys::virEventAddTimeout(0, Some(wake), std::ptr::null_mut(), None);
    }
    let _ = event_loop.stopped.recv_timeout(Duration::from_secs(10));
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
        // On a timeout the event loop stays: the open still runs on its
        // thread, and the process is about to answer and exit.
        let opened = rx.recv_timeout(CONNECT_TIMEOUT).map_err(|_| {
            CpiError::cloud(format!(
                "connecting to libvirt at {uri}: no answer within {} s (is libvirtd frozen or overloaded?)",
                CONNECT_TIMEOUT.as_secs()
            ))
            .retryable(true)
        })?;
        let conn = opened.map_err(|e| {
            release_event_loop();
            let hint = connect_hint(e.message(), uri);
            let mut error = lv_error(format!("connecting to libvirt at {uri}"), e);
            if let Some(hint) = hint {
                error.message.push_str(&format!(" ({hint})"));
            }
            error
        })?;
        // Local drivers have no keepalive; a remote one that refuses it still works.
        let _ = conn.set_keep_alive(5, 6);
        Ok(Libvirt {
            conn: Some(conn),
            uri: uri.to_string(),
            staging: std::sync::OnceLock::new(),
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
        drop(self.staging.take());
        if let Some(conn) = self.conn.take() {
            unsafe {
                virt::sys::virConnectClose(conn.as_ptr());
            }
            std::mem::forget(conn);
            release_event_loop();
        }
    }
}

/// libvirt's connection failures are terse; say what usually causes them,
/// for the transport the URI uses.
pub fn connect_hint(message: &str, uri: &str) -> Option<String> {
    let Ok(parsed) = LibvirtUri::parse(uri) else {
        return None;
    };
    let port = |default: u16| parsed.port.unwrap_or(default);
    let hint = match parsed.transport {
        Transport::Tls => {
            if message.contains("TLS confirmation") {
                "libvirtd refused this client's certificate: clientcert.pem/clientkey.pem under pkipath must be issued by a CA that libvirtd trusts".to_string()
            } else if message.contains("certificate") && message.contains("failed validation") {
                "the client certificate is not issued by the CA in pkipath's cacert.pem".to_string()
            } else if message.contains("Cannot read") && message.contains(".pem") {
                "pkipath must hold cacert.pem, clientcert.pem and clientkey.pem".to_string()
            } else if message.contains("Connection refused") {
                format!(
                    "is libvirtd listening for TLS on port {} of that host?",
                    port(16514)
                )
            } else {
                String::new()
            }
        }
        Transport::Tcp if message.contains("Connection refused") => format!(
            "is libvirtd listening for plain TCP (listen_tcp) on port {} of that host?",
            port(16509)
        ),
        Transport::Unix
            if ["No such file", "Connection refused", "Permission denied"]
                .iter()
                .any(|m| message.contains(m)) =>
        {
            format!(
                "is libvirtd running on this machine, and may this user open its socket ({})? \
                 The socket belongs to root and the libvirt group",
                parsed
                    .param("socket")
                    .unwrap_or("/var/run/libvirt/libvirt-sock")
            )
        }
        Transport::Ssh => ssh_hint(message, &parsed, port(22)),
        _ => String::new(),
    };
    Some(hint).filter(|h| !h.is_empty())
}

fn ssh_hint(message: &str, uri: &LibvirtUri, port: u16) -> String {
    let known_hosts = match uri.param("known_hosts") {
        Some(path) => format!("known_hosts= ({path})"),
        None if uri.runs_ssh_binary() => "the CPI user's ~/.ssh/known_hosts".to_string(),
        None => "libvirt's default known_hosts ($XDG_CONFIG_HOME/libvirt/known_hosts)".to_string(),
    };
    if message.contains("HOST KEY VERIFICATION FAILED")
        || message.contains("Host key verification failed")
    {
        format!("the host's ssh key is not the one {known_hosts} pins for it: a reinstalled host, or someone in the middle; compare the key with the host's own before you change known_hosts")
    } else if message.contains("was not accepted") || message.contains("host key") {
        format!("the host's ssh key is not in {known_hosts}; add the line `ssh-keyscan -p {port} <host>` prints, after checking it on the host")
    } else if ["Permission denied", "Access denied", "authenticat"]
        .iter()
        .any(|m| message.contains(m))
    {
        let key = uri
            .param("keyfile")
            .unwrap_or("the default ~/.ssh/id_* keys");
        format!("the ssh server refused the key {key}: its public key must be in the authorized_keys of the URI's user on the host")
    } else if message.contains("Connection refused") || message.contains("connect to host") {
        format!("is sshd listening on port {port} of that host?")
    } else if message.contains("nc:")
        || message.contains("not found")
        || message.contains("End of file")
    {
        "on the host, the URI's user must be able to run virt-ssh-helper (or nc) and open libvirtd's socket".to_string()
    } else {
        String::new()
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
