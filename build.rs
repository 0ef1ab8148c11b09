//! Embeds the libtorch library directory as an rpath so binaries and tests run without
//! LD_LIBRARY_PATH (torch-sys exports it to direct dependents as DEP_TCH_LIBTORCH_LIB).
fn main() {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
