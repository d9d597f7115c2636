//! Builds what a Kindling guest boots: kernels, initramfs, root images and function code,
//! all content-addressed in one [`Cache`] so that a second build is instant.
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
pub mod cli;
mod code;
mod ext4;
mod fsutil;
mod guest;
mod initramfs;
mod kernel;
pub mod locate;
mod manifest;
mod nested;
mod progress;
mod rootfs;

pub use archive::CpioArchive;
pub use cache::{Built, Cache, EntryInfo};
pub use code::{build_code_image, CodeError, CodeImage, MAX_UNZIPPED_BYTES};
pub use guest::is_static_elf;
pub use initramfs::{build_initramfs, Initramfs, INITRAMFS_FILE};
pub use kernel::{build_kernel, missing_options, Kernel, KernelKind, MINIMAL_FRAGMENT};
pub use manifest::{ImagesManifest, RootPaths};
pub use nested::{build_nested_host, NestedHost};
pub use rootfs::{
    build_root_image, DebianInfo, ImageInfo, RootImage, Runtime, ROOTFS_DIR, ROOTFS_EXT4,
};
