//! How a VM is rebooted: the guest is asked (ACPI) and given a grace period,
//! watched through libvirt's domain events (or, without them, by polling its
//! state), then reset the hard way; a shut-off domain is started.

use std::os::raw::{c_int, c_void};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use virt::domain::Domain;
use virt::sys;

use crate::error::Result;
use crate::libvirt::{lv_error, Libvirt};

pub use crate::host::RebootOutcome;

impl Libvirt {
    /// Asks the guest to reboot (ACPI), waits up to `grace` for it to do so,
    /// then resets the domain the hard way. A shut-off domain is started.
    /// When events cannot be registered the guest still gets the whole
    /// `grace` (a reboot is then invisible; only a stop ends the wait early).
    pub fn reboot_domain(
        &self,
        dom: &Domain,
        name: &str,
        grace: Duration,
    ) -> Result<RebootOutcome> {
        let active = dom
            .is_active()
            .map_err(|e| lv_error(format!("checking domain {name}"), e))?;
        if !active {
            self.start_domain(dom, name)?;
            return Ok(RebootOutcome::Started);
        }
        let watch = EventWatch::register(self, dom);
        let asked = dom.reboot(sys::VIR_DOMAIN_REBOOT_ACPI_POWER_BTN);
        let seen = match (wait_plan(watch.is_some(), asked.is_ok()), &watch) {
            (Wait::Events, Some(w)) => w.wait(grace),
            (Wait::PollState, _) => wait_until_stopped(dom, grace),
            _ => Seen::Nothing,
        };
        drop(watch);
        match seen {
            Seen::Reboot => Ok(RebootOutcome::Graceful),
            Seen::Stopped | Seen::Nothing
                if !dom
                    .is_active()
                    .map_err(|e| lv_error(format!("checking domain {name}"), e))? =>
            {
                self.start_domain(dom, name)?;
                Ok(RebootOutcome::Started)
            }
            _ => {
                dom.reset()
                    .map_err(|e| lv_error(format!("resetting domain {name}"), e))?;
                Ok(RebootOutcome::HardReset)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Nothing,
    Reboot,
    Stopped,
}

type Signal = Arc<(Mutex<Seen>, Condvar)>;

/// How a reboot waits for the guest after the ACPI request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// For the reboot or stop event, up to the grace period.
    Events,
    /// No events (registration failed) but the request went out: the guest
    /// still gets the whole grace period; only a stop is visible by polling.
    PollState,
    /// The request was refused: nothing will happen, reset at once.
    Nothing,
}

fn wait_plan(watching: bool, asked: bool) -> Wait {
    match (watching, asked) {
        (_, false) => Wait::Nothing,
        (true, true) => Wait::Events,
        (false, true) => Wait::PollState,
    }
}

/// How often the domain state is polled when events are not available.
const STATE_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Polls the domain's state for `grace`: `Stopped` once it is shut off,
/// `Nothing` when the grace period ends (or the state cannot be read; the
/// caller reads it again and reports that).
fn wait_until_stopped(dom: &Domain, grace: Duration) -> Seen {
    let deadline = Instant::now() + grace;
    loop {
        match dom.is_active() {
            Ok(false) => return Seen::Stopped,
            Ok(true) => {}
            Err(_) => return Seen::Nothing,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Seen::Nothing;
        }
        std::thread::sleep(left.min(STATE_POLL_INTERVAL));
    }
}

/// Reboot and lifecycle event callbacks for one domain, delivered by the
/// event loop thread started in `Libvirt::open`; deregistered on drop.
struct EventWatch {
    conn: sys::virConnectPtr,
    ids: Vec<c_int>,
    signal: Signal,
}

unsafe extern "C" fn on_reboot(_c: sys::virConnectPtr, _d: sys::virDomainPtr, opaque: *mut c_void) {
    // SAFETY: opaque is the Box<Signal> registered below, alive until freed by free_signal.
    let signal = unsafe { &*(opaque as *const Signal) };
    notify(signal, Seen::Reboot);
}

unsafe extern "C" fn on_lifecycle(
    _c: sys::virConnectPtr,
    _d: sys::virDomainPtr,
    event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: as in on_reboot.
    let signal = unsafe { &*(opaque as *const Signal) };
    if event == sys::VIR_DOMAIN_EVENT_STOPPED as c_int {
        notify(signal, Seen::Stopped);
    }
    0
}

unsafe extern "C" fn free_signal(opaque: *mut c_void) {
    // SAFETY: created by Box::into_raw in EventWatch::register, freed once by libvirt.
    drop(unsafe { Box::from_raw(opaque as *mut Signal) });
}

fn notify(signal: &Signal, seen: Seen) {
    if let Ok(mut s) = signal.0.lock() {
        if *s == Seen::Nothing {
            *s = seen;
        }
        signal.1.notify_all();
    }
}

impl EventWatch {
    fn register(lv: &Libvirt, dom: &Domain) -> Option<EventWatch> {
        let signal: Signal = Arc::new((Mutex::new(Seen::Nothing), Condvar::new()));
        // SAFETY: the pointers come from live virt objects; the callbacks have
        // the signatures libvirt calls them with (the lifecycle one is cast to
        // the generic type, as libvirt's VIR_DOMAIN_EVENT_CALLBACK does).
        let conn = unsafe { lv.conn().as_ptr() };
        let dom_ptr = unsafe { dom.as_ptr() };
        let mut ids = Vec::new();
        type Lifecycle = unsafe extern "C" fn(
            sys::virConnectPtr,
            sys::virDomainPtr,
            c_int,
            c_int,
            *mut c_void,
        ) -> c_int;
        type Generic = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
        let lifecycle: Lifecycle = on_lifecycle;
        // SAFETY: libvirt calls the callback with the lifecycle signature; the
        // generic type is only how the registration function is declared.
        let lifecycle = unsafe { std::mem::transmute::<Lifecycle, Generic>(lifecycle) };
        let callbacks: [(c_int, sys::virConnectDomainEventGenericCallback); 2] = [
            (sys::VIR_DOMAIN_EVENT_ID_REBOOT as c_int, Some(on_reboot)),
            (sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int, Some(lifecycle)),
        ];
        for (event, cb) in callbacks {
            let opaque = Box::into_raw(Box::new(signal.clone())) as *mut c_void;
            let id = unsafe {
                sys::virConnectDomainEventRegisterAny(
                    conn,
                    dom_ptr,
                    event,
                    cb,
                    opaque,
                    Some(free_signal),
                )
            };
            if id < 0 {
                // SAFETY: libvirt did not take the opaque pointer.
                unsafe { free_signal(opaque) };
                let watch = EventWatch { conn, ids, signal };
                drop(watch);
                return None;
            }
            ids.push(id);
        }
        Some(EventWatch { conn, ids, signal })
    }

    fn wait(&self, grace: Duration) -> Seen {
        let deadline = Instant::now() + grace;
        let Ok(mut seen) = self.signal.0.lock() else {
            return Seen::Nothing;
        };
        while *seen == Seen::Nothing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.signal.1.wait_timeout(seen, left) {
                Ok((s, _)) => seen = s,
                Err(_) => return Seen::Nothing,
            }
        }
        *seen
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        for id in &self.ids {
            // SAFETY: ids were returned by virConnectDomainEventRegisterAny on this connection.
            unsafe {
                sys::virConnectDomainEventDeregisterAny(self.conn, *id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reboot_waits_the_grace_period_even_without_events() {
        assert_eq!(wait_plan(true, true), Wait::Events);
        assert_eq!(wait_plan(false, true), Wait::PollState);
        assert_eq!(wait_plan(true, false), Wait::Nothing);
        assert_eq!(wait_plan(false, false), Wait::Nothing);
    }
}
