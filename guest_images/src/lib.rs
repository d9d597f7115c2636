//! Builds what a Kindling guest boots: kernels, initramfs, root images and function code.

pub mod locate;
