//! Builds what a Kindling guest boots: kernels, initramfs, root images and function code,
//! all content-addressed in one [`Cache`] so that a second build is instant. Long steps
//! report to the [`Progress`] a cache is given; the runtime shims are compiled in, so only
//! the static guest binaries are looked for at run time ([`locate::guest_bin_dir`]).
//!
//! ```no_run
//! use kindling_images::{build_code_image, build_initramfs, build_kernel, build_root_image};
//! use kindling_images::{Cache, KernelKind, Runtime};
//! # fn main() -> anyhow::Result<()> {
//! let cache = Cache::open()?;
//! let kernel = build_kernel(&cache, KernelKind::Minimal)?; // kernel.vmlinux, kernel.bzimage
//! let initramfs = build_initramfs(&cache, &kernel)?; // initramfs.path
//! let root = build_root_image(&cache, Runtime::Python)?; // root.ext4 -> /dev/vda
//! let code = build_code_image(&cache, "examples/hello-python".as_ref(), Runtime::Python, "app.handler")?;
//! // code.ext4 -> /dev/vdb, mounted at /var/task; code.dir for the sandbox
//! # Ok(()) }
//! ```

mod archive;
mod cache;
mod code;
mod ext4;
mod fsutil;
mod guest;
mod initramfs;
mod kernel;
pub mod locate;
mod manifest;
mod nested;
mod node;
mod progress;
mod prune;
mod rootfs;
mod shims;

pub use archive::CpioArchive;
pub use cache::{Built, Cache, EntryInfo};
pub use code::{
    build_code_image, build_layers_image, CodeError, CodeImage, MAX_LAYERS, MAX_UNZIPPED_BYTES,
};
pub use guest::is_static_elf;
pub use initramfs::{build_initramfs, Initramfs, INITRAMFS_FILE};
pub use kernel::{build_kernel, missing_options, Kernel, KernelKind, MINIMAL_FRAGMENT};
pub use manifest::{ImagesManifest, RootPaths};
pub use nested::{build_nested_host, NestedHost};
pub use node::NODE_VERSION;
pub use progress::{Progress, StepProgress};
pub use prune::prune;
pub use rootfs::{
    build_root_image, DebianInfo, ImageInfo, RootImage, Runtime, ROOTFS_DIR, ROOTFS_EXT4,
};
pub use shims::{write_shims, ShimFile, COMPILED_SHIMS_DIR};
