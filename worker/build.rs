//! Embeds the libtorch library directory as an rpath so binaries and tests run without
//! LD_LIBRARY_PATH (torch-sys exports it to direct dependents as DEP_TCH_LIBTORCH_LIB).
//!
//! With the `cuda` feature it also links libtorch's CUDA library: nothing calls it by name (its
//! static initialisers register CUDA with libtorch), so the linker's `--as-needed` would drop
//! it and libtorch would see no GPU. With `nccl`, the wheel's NCCL directory joins the rpath
//! (see worker/src/collective/nccl.rs for the `libnccl.so` link it must hold).
fn main() {
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    if std::env::var_os("CARGO_FEATURE_NCCL").is_some() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}/../../nvidia/nccl/lib");
    }
}
