//! Domains (VMs): lookup and the state the CPI reads from them.

use virt::domain::Domain;

use super::{not_found_as_none, Libvirt};
use crate::error::Result;

impl Libvirt {
    pub fn find_domain(&self, name: &str) -> Result<Option<Domain>> {
        not_found_as_none(
            self.conn().lookup_domain_by_name(name),
            format!("looking up domain {name}"),
        )
    }
}
