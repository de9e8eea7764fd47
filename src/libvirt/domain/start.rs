//! Starting a domain paused, and knowing when libvirt has given its NICs
//! their ports on libvirt networks (see `VmHost::start_paused_vm_with`).
//!
//! A starting domain's live definition cannot be read until the start is
//! over (libvirt holds the domain meanwhile), so the ports are counted on
//! the networks instead: the start has its ports once each network it has
//! NICs on counts that many more ports than before it. A port of another
//! domain started at the same moment may count as one of ours; whatever
//! waits then may run before our ports are given, and the start waits for
//! it instead: time lost, nothing else.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use virt::domain::Domain;
use virt::network::Network;
use virt::sys;

use crate::error::Result;
use crate::libvirt::{lv_error, Libvirt};

/// How often the ports are counted (one round trip per network), and for
/// how long at most: a start that takes longer gets its ports late or
/// never, and whatever waits runs anyway.
const PORT_POLL: Duration = Duration::from_millis(5);
const PORT_WAIT: Duration = Duration::from_secs(10);

/// The networks a domain's NICs are on, each with the number of ports it
/// has once the domain's are given (none: nothing to wait for).
#[derive(Default)]
pub struct PortWatch(Vec<(Network, String, usize)>);

impl Libvirt {
    /// Starts the domain with its CPUs paused: QEMU runs, the guest does not.
    pub fn start_domain_paused(&self, dom: &Domain, name: &str) -> Result<()> {
        dom.create_with_flags(sys::VIR_DOMAIN_START_PAUSED)
            .map_err(|e| lv_error(format!("starting domain {name} paused"), e))
    }

    pub fn resume_domain(&self, dom: &Domain, name: &str) -> Result<()> {
        dom.resume()
            .map_err(|e| lv_error(format!("resuming domain {name}"), e))
    }

    /// Counts, before the domain starts, the ports of the libvirt networks
    /// its NICs are on.
    pub fn watch_ports(&self, dom: &Domain, name: &str) -> Result<PortWatch> {
        let mut nics: BTreeMap<String, usize> = BTreeMap::new();
        for (_, net) in self.domain_facts(dom, name)?.interfaces {
            *nics.entry(net).or_default() += 1;
        }
        let mut watch = Vec::new();
        for (net_name, ours) in nics {
            if let Some(net) = self.find_network(&net_name)? {
                let before = port_count(&net, &net_name)?;
                watch.push((net, net_name, before + ours));
            }
        }
        Ok(PortWatch(watch))
    }

    /// Returns once every watched network counts its ports with the
    /// domain's, once `start_ended` says the start is over, or after
    /// `PORT_WAIT`. A count that fails counts as not yet.
    pub fn wait_for_ports(&self, watch: &PortWatch, start_ended: &dyn Fn() -> bool) {
        let since = Instant::now();
        while !start_ended() && since.elapsed() < PORT_WAIT {
            let given = watch
                .0
                .iter()
                .all(|(net, name, want)| port_count(net, name).is_ok_and(|n| n >= *want));
            if given {
                return;
            }
            std::thread::sleep(PORT_POLL);
        }
    }
}

/// How many ports the network has (virNetworkListAllPorts asked only to
/// count: the virt crate does not wrap it).
fn port_count(net: &Network, name: &str) -> Result<usize> {
    // SAFETY: `net` is a live network object; a null array asks for the count only.
    let n = unsafe { sys::virNetworkListAllPorts(net.as_ptr(), std::ptr::null_mut(), 0) };
    usize::try_from(n).map_err(|_| {
        lv_error(
            format!("counting the ports of libvirt network {name}"),
            virt::error::Error::last_error(),
        )
    })
}
