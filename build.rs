//! Builds the small C shim over ISA-L's inflate (src/image/archive/isal_shim.c) and
//! links the system's libisal (Debian: libisal-dev; ci/install-deps).
fn main() {
    println!("cargo:rerun-if-changed=src/image/archive/isal_shim.c");
    cc::Build::new()
        .file("src/image/archive/isal_shim.c")
        .warnings(true)
        .compile("cpi_isal_shim");
    println!("cargo:rustc-link-lib=isal");
}
