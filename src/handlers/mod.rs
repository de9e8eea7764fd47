//! CPI method handlers: one exhaustive match from `Method` to the function that
//! does it, with the host seam (`LibvirtHost`, connecting on first use, so
//! `info` and every request a handler refuses by itself never touch libvirt),
//! the config and the logger.

mod attach;
#[cfg(test)]
mod attach_tests;
mod disk;
mod disk_record;
#[cfg(test)]
mod disk_tests;
mod holder;
pub mod info;
mod snapshot;
mod stemcell;
mod stemcell_delete;
mod stemcell_sweep;
#[cfg(test)]
mod stemcell_tests;
mod sweep;
mod vm;

use std::cell::OnceCell;
use std::time::Duration;

use serde_json::Value;

use crate::config::Config;
use crate::envelope::Request;
use crate::error::{CpiError, Result};
use crate::libvirt::host::LibvirtHost;
use crate::libvirt::Libvirt;
use crate::log::Logger;
use crate::method::Method;

pub struct Call<'a> {
    pub config: &'a Config,
    pub log: &'a mut Logger,
    pub request: &'a Request,
    libvirt: OnceCell<Libvirt>,
}

impl<'a> Call<'a> {
    pub fn new(config: &'a Config, log: &'a mut Logger, request: &'a Request) -> Self {
        Call {
            config,
            log,
            request,
            libvirt: OnceCell::new(),
        }
    }

    /// The host of disks, stemcells and VMs (connecting on first use), and the logger.
    pub fn host(&mut self) -> (LibvirtHost<'_>, &mut Logger) {
        (LibvirtHost::new(&self.libvirt, self.config), &mut *self.log)
    }
}

pub fn dispatch(method: Method, call: &mut Call) -> Result<Value> {
    match method {
        Method::Info => info::info(call.config),
        Method::HasVm { vm_cid } => vm::has_vm(&call.host().0, &vm_cid),
        Method::CreateVm {
            agent_id,
            stemcell_cid,
            cloud_properties,
            networks,
            disk_cids,
            env,
        } => {
            let v1 = call.request.wants_v1_shapes();
            let stemcell_api = call
                .request
                .context
                .get("vm")
                .and_then(|v| v.pointer("/stemcell/api_version"))
                .and_then(Value::as_u64);
            let config = call.config;
            let (host, log) = call.host();
            let args = vm::CreateVm {
                agent_id: &agent_id,
                stemcell_cid: &stemcell_cid,
                cloud_properties: &cloud_properties,
                networks: &networks,
                disk_cids: &disk_cids,
                env: &env,
                stemcell_api,
            };
            // v1 callers get the bare VM CID, not [cid, networks] (cpi-contract.md 1.4).
            vm::create_vm(&host, log, config, args).map(|mut result| {
                if v1 {
                    result.get_mut(0).map(Value::take).unwrap_or_default()
                } else {
                    result
                }
            })
        }
        Method::DeleteVm { vm_cid } => {
            let (host, log) = call.host();
            vm::delete_vm(&host, log, &vm_cid)
        }
        Method::RebootVm { vm_cid } => {
            let grace = Duration::from_secs(call.config.reboot_grace_seconds);
            let (host, log) = call.host();
            vm::reboot_vm(&host, log, &vm_cid, grace)
        }
        Method::SetVmMetadata { vm_cid, metadata } => {
            let (host, log) = call.host();
            vm::set_vm_metadata(&host, log, &vm_cid, &metadata)
        }
        Method::CalculateVmCloudProperties {
            cpu,
            ram_mib,
            ephemeral_disk_mib,
        } => vm::calculate_vm_cloud_properties(cpu, ram_mib, ephemeral_disk_mib),
        Method::CreateDisk {
            size_mib,
            cloud_properties,
            vm_locality,
        } => {
            let (host, log) = call.host();
            disk::create_disk(
                &host,
                log,
                size_mib,
                &cloud_properties,
                vm_locality.as_deref(),
            )
        }
        Method::DeleteDisk { disk_cid } => {
            let (host, log) = call.host();
            disk::delete_disk(&host, log, &disk_cid)
        }
        Method::HasDisk { disk_cid } => disk::has_disk(&call.host().0, &disk_cid),
        Method::AttachDisk { vm_cid, disk_cid } => {
            let v1 = call.request.wants_v1_shapes();
            let (host, log) = call.host();
            // v1 callers get null, not the disk hint (cpi-contract.md 1.4).
            attach::attach_disk(&host, log, &vm_cid, &disk_cid).map(|hint| {
                if v1 {
                    Value::Null
                } else {
                    hint
                }
            })
        }
        Method::DetachDisk { vm_cid, disk_cid } => {
            let (host, log) = call.host();
            attach::detach_disk(&host, log, &vm_cid, &disk_cid)
        }
        Method::GetDisks { vm_cid } => disk::get_disks(&call.host().0, &vm_cid),
        Method::ResizeDisk {
            disk_cid,
            new_size_mib,
        } => {
            let (host, log) = call.host();
            disk::resize_disk(&host, log, &disk_cid, new_size_mib)
        }
        Method::UpdateDisk { disk_cid, .. } => disk::update_disk(call.log, &disk_cid),
        Method::SetDiskMetadata { disk_cid, metadata } => {
            let (host, log) = call.host();
            disk::set_disk_metadata(&host, log, &disk_cid, &metadata)
        }
        Method::SnapshotDisk { disk_cid, metadata } => {
            let (host, log) = call.host();
            snapshot::snapshot_disk(&host, log, &disk_cid, &metadata)
        }
        Method::DeleteSnapshot { snapshot_cid } => {
            let (host, log) = call.host();
            snapshot::delete_snapshot(&host, log, &snapshot_cid)
        }
        Method::CreateStemcell {
            image_path,
            cloud_properties,
        } => {
            let (host, log) = call.host();
            stemcell::create_stemcell(&host, log, &image_path, &cloud_properties)
        }
        Method::DeleteStemcell { stemcell_cid } => {
            let (host, log) = call.host();
            stemcell_delete::delete_stemcell(&host, log, &stemcell_cid)
        }
        Method::CurrentVmId => Err(CpiError::not_implemented(
            "current_vm_id is not implemented: the CPI does not run inside a VM it manages",
        )),
    }
}
