//! Linux boot (x86-64 64-bit boot protocol) with linux-loader: an ELF `vmlinux` or a
//! `bzImage` at 1 MiB, the command line, an initramfs at the top of low RAM, the e820 map,
//! the zero page and an MP table, then a CPL0 long-mode entry with `rsi` pointing at the zero page.
//!
//! PVH entry is not used: the 64-bit entry works for both image formats and needs no 32-bit
//! vCPU setup. (An ELF with a PVH note still has a 64-bit entry point.)

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, ReadVolatile};

use crate::cpu::EntryPoint;
use crate::layout::*;
use crate::memory::GuestMemory;

/// Errors loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("opening {0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error("{0} is neither an x86-64 ELF vmlinux nor a bzImage (ELF: {1}; bzImage: {2})")]
    NotAKernel(PathBuf, loader::Error, loader::Error),
    #[error("kernel command line")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("writing the command line: {0}")]
    LoadCmdline(loader::Error),
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooBig { path: PathBuf, size: u64 },
    #[error("loading initrd {0}: {1}")]
    Initrd(PathBuf, String),
    #[error(transparent)]
    Mptable(#[from] crate::mptable::MptableError),
    #[error(transparent)]
    Acpi(#[from] crate::acpi::AcpiError),
    #[error("writing boot parameters: {0}")]
    BootParams(linux_loader::configurator::Error),
}

/// What to boot (Firecracker's `boot-source`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSource {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub boot_args: String,
}

/// Default kernel command line (Firecracker's, with the Kindling conventions: serial console,
/// i8042 reset to stop the VM).
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

const E820_RAM: u32 = 1;
/// Not RAM, and nothing for the kernel to hand out: the MP table and the ACPI tables' area.
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// [`CMDLINE_START`] as the 32-bit `cmd_line_ptr`; the build fails if it is not below 4 GiB.
const CMDLINE_PTR: u32 = match CMDLINE_START.to_le_bytes() {
    [a, b, c, d, 0, 0, 0, 0] => u32::from_le_bytes([a, b, c, d]),
    _ => panic!("the command line must be below 4 GiB"),
};
/// Offset of the 64-bit entry point in the protected-mode part of a bzImage.
const BZIMAGE_64BIT_ENTRY: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

/// The e820 map (address, size, type) for a guest with RAM ending at `ram_end` (the last
/// RAM address + 1, above 4 GiB when memory spans the MMIO hole): RAM, and like Firecracker's
/// the area below 1 MiB holding the MP and ACPI tables reserved.
pub fn e820_map(ram_end: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    let low_end = ram_end.min(MMIO_START);
    if low_end > HIMEM_START {
        map.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    }
    if ram_end > FOUR_GIB {
        map.push((FOUR_GIB, ram_end - FOUR_GIB, E820_RAM));
    }
    map
}

/// Where an initrd of `size` bytes goes: page-aligned at the top of RAM below the MMIO hole,
/// above `kernel_end`.
pub fn initrd_address(low_ram_end: u64, kernel_end: u64, size: u64) -> Option<u64> {
    let addr = low_ram_end.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end).then_some(addr)
}

/// The full kernel command line: the configured arguments plus the device declarations.
pub fn build_cmdline(boot_args: &str, devices: &[String]) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE)?;
    if !boot_args.trim().is_empty() {
        cmdline.insert_str(boot_args.trim())?;
    }
    for dev in devices {
        cmdline.insert_str(dev)?;
    }
    Ok(cmdline)
}

/// The `virtio_mmio.device=` declarations of the virtio-mmio devices at `slots` (base, IRQ),
/// for kernels that do not read the ACPI tables.
pub fn virtio_cmdline(slots: &[(u64, u32)]) -> Vec<String> {
    slots
        .iter()
        .map(|(base, irq)| format!("virtio_mmio.device=4K@{base:#x}:{irq}"))
        .collect()
}

/// Loads the kernel, initrd, command line and zero page, and describes the machine
/// (`vcpu_count` vCPUs, the virtio-mmio devices at `virtio` slots) twice: in an MP table and
/// the command line for kernels without ACPI, in ACPI tables for the others. Returns the boot
/// vCPU's entry.
pub fn load_linux(
    mem: &GuestMemory,
    source: &BootSource,
    virtio: &[(u64, u32)],
    vcpu_count: u8,
) -> Result<EntryPoint, BootError> {
    let open = |p: &Path| File::open(p).map_err(|e| BootError::Open(p.to_path_buf(), e));
    let mut kernel = open(&source.kernel)?;
    let highmem = Some(GuestAddress(HIMEM_START));
    let (loaded, entry) = match Elf::load(mem, None, &mut kernel, highmem) {
        Ok(r) => {
            let entry = r.kernel_load.raw_value();
            (r, entry)
        }
        Err(elf_err) => match BzImage::load(mem, None, &mut kernel, highmem) {
            Ok(r) => {
                let entry = r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY;
                (r, entry)
            }
            Err(bz_err) => {
                return Err(BootError::NotAKernel(
                    source.kernel.clone(),
                    elf_err,
                    bz_err,
                ))
            }
        },
    };

    let cmdline = build_cmdline(&source.boot_args, &virtio_cmdline(virtio))?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(BootError::LoadCmdline)?;

    let mut params = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_PTR;
    // `Cmdline` holds at most CMDLINE_MAX_SIZE bytes, the terminating NUL included.
    params.hdr.cmdline_size = u32::try_from(cmdline.as_cstring()?.as_bytes_with_nul().len())
        .map_err(|_| linux_loader::cmdline::Error::TooLarge)?;

    let ram_end = mem.last_addr().raw_value() + 1;
    if let Some(path) = &source.initrd {
        let mut file = open(path)?;
        let size = file
            .metadata()
            .map_err(|e| BootError::Open(path.clone(), e))?
            .len();
        let kernel_end = loaded.kernel_load.raw_value() + loaded.kernel_end;
        let addr = initrd_address(ram_end.min(MMIO_START), kernel_end, size).ok_or_else(|| {
            BootError::InitrdTooBig {
                path: path.clone(),
                size,
            }
        })?;
        // Below the MMIO hole, so both fit the 32-bit fields of the boot protocol.
        let (Ok(len), Ok(image), Ok(image_size)) = (
            usize::try_from(size),
            u32::try_from(addr),
            u32::try_from(size),
        ) else {
            return Err(BootError::InitrdTooBig {
                path: path.clone(),
                size,
            });
        };
        let mut slice = mem
            .get_slice(GuestAddress(addr), len)
            .map_err(|e| BootError::Initrd(path.clone(), e.to_string()))?;
        file.read_exact_volatile(&mut slice)
            .map_err(|e| BootError::Initrd(path.clone(), e.to_string()))?;
        params.hdr.ramdisk_image = image;
        params.hdr.ramdisk_size = image_size;
    }

    // The zero page has 128 e820 slots (fewer than u8::MAX); count the ones written.
    params.e820_entries = 0;
    for (slot, (addr, size, r#type)) in params.e820_table.iter_mut().zip(e820_map(ram_end)) {
        *slot = boot_e820_entry { addr, size, r#type };
        params.e820_entries += 1;
    }
    params.acpi_rsdp_addr =
        crate::acpi::write_tables(mem, &crate::acpi::Machine { vcpu_count, virtio })?;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::BootParams)?;
    crate::mptable::setup(mem, vcpu_count)?;

    Ok(EntryPoint {
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        user_mode: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use vm_memory::Bytes;

    #[test]
    fn e820_covers_low_ram_reserves_the_tables_and_skips_the_hole() {
        let low = [
            (0, EBDA_START, E820_RAM),
            (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        ];
        let mut small = low.to_vec();
        small.push((HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM));
        assert_eq!(e820_map(128 << 20), small);
        let big = FOUR_GIB + (1 << 30);
        let mut large = low.to_vec();
        large.extend([
            (HIMEM_START, MMIO_START - HIMEM_START, E820_RAM),
            (FOUR_GIB, 1 << 30, E820_RAM),
        ]);
        assert_eq!(e820_map(big), large);
    }

    #[test]
    fn initrd_goes_page_aligned_to_the_top_and_never_over_the_kernel() {
        assert_eq!(
            initrd_address(64 << 20, 8 << 20, 5000),
            Some((64 << 20) - 8192)
        );
        assert_eq!(initrd_address(64 << 20, 60 << 20, 5 << 20), None);
        assert_eq!(initrd_address(1 << 20, 0, 2 << 20), None);
    }

    #[test]
    fn cmdline_appends_devices_and_rejects_overflow() {
        let c = build_cmdline(
            DEFAULT_BOOT_ARGS,
            &["virtio_mmio.device=4K@0xd0001000:5".into()],
        )
        .unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 reboot=k panic=1 pci=off virtio_mmio.device=4K@0xd0001000:5"
        );
        assert!(build_cmdline(&"x".repeat(CMDLINE_MAX_SIZE + 1), &[]).is_err());
    }

    #[test]
    fn a_file_that_is_not_a_kernel_is_a_clear_error() {
        let path = std::env::temp_dir().join(format!("kindling-notakernel-{}", std::process::id()));
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let mem = create_guest_memory(32).unwrap();
        let src = BootSource {
            kernel: path.clone(),
            initrd: None,
            boot_args: String::new(),
        };
        let err = load_linux(&mem, &src, &[], 1).unwrap_err();
        assert!(
            err.to_string()
                .contains("neither an x86-64 ELF vmlinux nor a bzImage"),
            "{err}"
        );
        let missing = BootSource {
            kernel: "/nonexistent/vmlinux".into(),
            ..src
        };
        assert!(matches!(
            load_linux(&mem, &missing, &[], 1),
            Err(BootError::Open(..))
        ));
        std::fs::remove_file(path).unwrap();
    }

    /// Against the real guest kernel built by the images pipeline (`KINDLING_KERNEL`).
    #[test]
    fn real_kernel_boot_params_layout() {
        let Some(kernel) = std::env::var_os("KINDLING_KERNEL") else {
            println!("SKIPPED: KINDLING_KERNEL is not set (path of the guest kernel, vmlinux or bzImage)");
            return;
        };
        let mem = create_guest_memory(128).unwrap();
        let initrd = std::env::temp_dir().join(format!("kindling-initrd-{}", std::process::id()));
        std::fs::write(&initrd, vec![0xa5; 10_000]).unwrap();
        let src = BootSource {
            kernel: kernel.into(),
            initrd: Some(initrd.clone()),
            boot_args: DEFAULT_BOOT_ARGS.into(),
        };
        let entry = load_linux(&mem, &src, &[(0xd000_1000, 5)], 2).unwrap();
        assert!(!entry.user_mode);
        assert_eq!(
            (entry.rsi, entry.rsp),
            (ZERO_PAGE_START, BOOT_STACK_POINTER)
        );
        assert!(entry.rip >= HIMEM_START, "entry {:#x}", entry.rip);

        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!(u64::from(hdr.cmd_line_ptr), CMDLINE_START);
        let expected = format!("{DEFAULT_BOOT_ARGS} virtio_mmio.device=4K@0xd0001000:5\0");
        assert_eq!({ hdr.cmdline_size } as usize, expected.len());
        let mut cmdline = vec![0u8; expected.len()];
        mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(cmdline, expected.as_bytes());

        let (rd_addr, rd_size) = (u64::from(hdr.ramdisk_image), { hdr.ramdisk_size });
        assert_eq!(rd_size, 10_000);
        assert_eq!(rd_addr % PAGE_SIZE, 0);
        assert!(rd_addr + 10_000 <= 128 << 20 && rd_addr + 2 * PAGE_SIZE > (128 << 20) - 10_000);
        let mut rd = vec![0u8; 10_000];
        mem.read_slice(&mut rd, GuestAddress(rd_addr)).unwrap();
        assert!(rd.iter().all(|&b| b == 0xa5));

        assert_eq!({ params.acpi_rsdp_addr }, crate::layout::ACPI_START);
        let mut rsdp = [0u8; 8];
        mem.read_slice(&mut rsdp, GuestAddress(crate::layout::ACPI_START))
            .unwrap();
        assert_eq!(&rsdp, b"RSD PTR ");
        assert_eq!(params.e820_entries, 3);
        let reserved = params.e820_table[1];
        assert_eq!(
            ({ reserved.addr }, { reserved.r#type }),
            (EBDA_START, E820_RESERVED)
        );
        let e1 = params.e820_table[2];
        assert_eq!(
            ({ e1.addr }, { e1.size }, { e1.r#type }),
            (HIMEM_START, (128 << 20) - HIMEM_START, 1)
        );
        std::fs::remove_file(initrd).unwrap();
    }
}
