//! CPI method handlers: one exhaustive match from `Method` to the function that
//! does it. Handlers get a `Call`, which carries the config, the logger and a
//! libvirt connection opened on first use (so `info` never touches libvirt).

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

use serde_json::Value;

use crate::config::Config;
use crate::envelope::Request;
use crate::error::{CpiError, Result};
use crate::libvirt::host::{connect, LibvirtDisks};
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

    /// The connection, opened on first use.
    pub fn libvirt(&mut self) -> Result<&Libvirt> {
        if self.libvirt.get().is_none() {
            self.log
                .debug(format!("connecting to {}", self.config.libvirt_uri()));
        }
        connect(&self.libvirt, &self.config.libvirt_uri())
    }

    /// The connection, the logger and the config at once, for handlers that
    /// log while they hold the connection.
    pub fn parts(&mut self) -> Result<(&Libvirt, &mut Logger, &'a Config)> {
        self.libvirt()?;
        let lv = self
            .libvirt
            .get()
            .ok_or_else(|| CpiError::cloud("libvirt connection is not open"))?;
        Ok((lv, &mut *self.log, self.config))
    }

    /// The disk and stemcell host (connecting on first use) and the logger.
    pub fn disks(&mut self) -> (LibvirtDisks<'_>, &mut Logger) {
        (
            LibvirtDisks::new(&self.libvirt, self.config),
            &mut *self.log,
        )
    }
}

pub fn dispatch(method: Method, call: &mut Call) -> Result<Value> {
    match method {
        Method::Info => info::info(call.config),
        Method::HasVm { vm_cid } => vm::has_vm(call, &vm_cid),
        Method::CreateVm {
            agent_id,
            stemcell_cid,
            cloud_properties,
            networks,
            disk_cids,
            env,
        } => vm::create_vm(
            call,
            vm::CreateVm {
                agent_id: &agent_id,
                stemcell_cid: &stemcell_cid,
                cloud_properties: &cloud_properties,
                networks: &networks,
                disk_cids: &disk_cids,
                env: &env,
            },
        ),
        Method::DeleteVm { vm_cid } => vm::delete_vm(call, &vm_cid),
        Method::RebootVm { vm_cid } => vm::reboot_vm(call, &vm_cid),
        Method::SetVmMetadata { vm_cid, metadata } => vm::set_vm_metadata(call, &vm_cid, &metadata),
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
            let (host, log) = call.disks();
            disk::create_disk(
                &host,
                log,
                size_mib,
                &cloud_properties,
                vm_locality.as_deref(),
            )
        }
        Method::DeleteDisk { disk_cid } => {
            let (host, log) = call.disks();
            disk::delete_disk(&host, log, &disk_cid)
        }
        Method::HasDisk { disk_cid } => disk::has_disk(&call.disks().0, &disk_cid),
        Method::AttachDisk { vm_cid, disk_cid } => {
            let v1 = call.request.wants_v1_shapes();
            let (host, log) = call.disks();
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
            let (host, log) = call.disks();
            attach::detach_disk(&host, log, &vm_cid, &disk_cid)
        }
        Method::GetDisks { vm_cid } => disk::get_disks(&call.disks().0, &vm_cid),
        Method::ResizeDisk {
            disk_cid,
            new_size_mib,
        } => {
            let (host, log) = call.disks();
            disk::resize_disk(&host, log, &disk_cid, new_size_mib)
        }
        Method::UpdateDisk { disk_cid, .. } => disk::update_disk(call.log, &disk_cid),
        Method::SetDiskMetadata { disk_cid, metadata } => {
            let (host, log) = call.disks();
            disk::set_disk_metadata(&host, log, &disk_cid, &metadata)
        }
        Method::SnapshotDisk { disk_cid, metadata } => {
            let (host, log) = call.disks();
            snapshot::snapshot_disk(&host, log, &disk_cid, &metadata)
        }
        Method::DeleteSnapshot { snapshot_cid } => {
            let (host, log) = call.disks();
            snapshot::delete_snapshot(&host, log, &snapshot_cid)
        }
        Method::CreateStemcell {
            image_path,
            cloud_properties,
        } => {
            let (host, log) = call.disks();
            stemcell::create_stemcell(&host, log, &image_path, &cloud_properties)
        }
        Method::DeleteStemcell { stemcell_cid } => {
            let (host, log) = call.disks();
            stemcell_delete::delete_stemcell(&host, log, &stemcell_cid)
        }
        Method::CurrentVmId => Err(CpiError::not_implemented(
            "current_vm_id is not implemented: the CPI does not run inside a VM it manages",
        )),
    }
}
