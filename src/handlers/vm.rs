//! VM methods.

use serde_json::Value;

use super::Call;
use crate::error::Result;

/// True while a domain of that name is defined (running or not); a CID that is
/// not ours is simply absent. Errors only for infrastructure failures.
pub fn has_vm(call: &mut Call, vm_cid: &str) -> Result<Value> {
    if !crate::cid::is_vm_cid(vm_cid) {
        return Ok(Value::Bool(false));
    }
    let found = call.libvirt()?.find_domain(vm_cid)?.is_some();
    Ok(Value::Bool(found))
}
