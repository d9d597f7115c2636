//! A CPL3 test guest: a 108-byte script interpreter (machine code below) that the VMM starts
//! in user mode, because the CI machines' nested KVM emulates ring 0 but runs ring 3 natively.
//! The host writes a script of `(op, addr, value)` triples into guest memory; the guest walks
//! it, so each test is a few lines of data instead of new machine code.
#![allow(dead_code)] // each test binary uses a different part of this helper

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use kindling_vmm::cpu::EntryPoint;
use kindling_vmm::cpu_template::CpuTemplate;
use kindling_vmm::exit::{ExitReason, VmExit};
use kindling_vmm::memory::GuestMemory;
use kindling_vmm::vm::{Timings, Vm, VmConfig};
use serde_json::Value;
use vm_memory::{Bytes, GuestAddress};

/// The interpreter, assembled from (intel syntax, `as --64`):
/// ```text
/// start: mov rax,[rsi]; mov rdx,[rsi+8]; mov rcx,[rsi+16]; add rsi,24
///        cmp eax,1; je w32   cmp eax,2; je p32   cmp eax,3; je o8   cmp eax,4; je w8
///        cmp eax,5; je e32   cmp eax,6; je pin8  cmp eax,7; je cid
///        hlt                                                ; op 0: end with #GP
/// w32:   mov [rdx],ecx; jmp start                           ; op 1: 32-bit store
/// p32:   cmp [rdx],ecx; jne p32; jmp start                  ; op 2: poll until equal
/// o8:    mov eax,ecx; out dx,al; jmp start                  ; op 3: port write
/// w8:    mov [rdx],cl; jmp start                            ; op 4: 8-bit store
/// e32:   cmp [rdx],ecx; je start; hlt                       ; op 5: expect, else #GP
/// pin8:  in al,dx; cmp al,cl; jne pin8; jmp start           ; op 6: poll a port
/// cid:   mov r8,rdx; mov eax,ecx; xor ecx,ecx; cpuid        ; op 7: CPUID leaf, subleaf 0,
///        mov [r8],eax; mov [r8+4],ebx; mov [r8+8],ecx        ;       stored at addr
///        mov [r8+12],edx; jmp start
/// ```
/// `hlt` at CPL3 raises #GP; with an empty IDT that becomes a triple fault, which the VMM
/// reports as [`ExitReason::TripleFault`]: a failed expectation is visible as that exit.
const INTERPRETER: [u8; 108] = [
    0x48, 0x8b, 0x06, 0x48, 0x8b, 0x56, 0x08, 0x48, 0x8b, 0x4e, 0x10, 0x48, 0x83, 0xc6, 0x18, 0x83,
    0xf8, 0x01, 0x74, 0x1f, 0x83, 0xf8, 0x02, 0x74, 0x1e, 0x83, 0xf8, 0x03, 0x74, 0x1f, 0x83, 0xf8,
    0x04, 0x74, 0x1f, 0x83, 0xf8, 0x05, 0x74, 0x1e, 0x83, 0xf8, 0x06, 0x74, 0x1e, 0x83, 0xf8, 0x07,
    0x74, 0x20, 0xf4, 0x89, 0x0a, 0xeb, 0xc9, 0x39, 0x0a, 0x75, 0xfc, 0xeb, 0xc3, 0x89, 0xc8, 0xee,
    0xeb, 0xbe, 0x88, 0x0a, 0xeb, 0xba, 0x39, 0x0a, 0x74, 0xb6, 0xf4, 0xec, 0x38, 0xc8, 0x75, 0xfb,
    0xeb, 0xae, 0x49, 0x89, 0xd0, 0x89, 0xc8, 0x31, 0xc9, 0x0f, 0xa2, 0x41, 0x89, 0x00, 0x41, 0x89,
    0x58, 0x04, 0x41, 0x89, 0x48, 0x08, 0x41, 0x89, 0x50, 0x0c, 0xeb, 0x94,
];
const CODE_ADDR: u64 = 0x10000;
const SCRIPT_ADDR: u64 = 0x11000;
const STACK_TOP: u64 = 0x8ff0;

/// One guest action.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Write32(u64, u32),
    PollEq32(u64, u32),
    Out8(u16, u8),
    Write8(u64, u8),
    Expect32(u64, u32),
    PollIn8(u16, u8),
    /// CPUID `leaf` (subleaf 0); eax, ebx, ecx, edx stored at the address.
    Cpuid(u64, u32),
}

fn encode(script: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut push = |op: u64, addr: u64, val: u64| {
        for v in [op, addr, val] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    };
    for op in script {
        match *op {
            Op::Write32(a, v) => push(1, a, v.into()),
            Op::PollEq32(a, v) => push(2, a, v.into()),
            Op::Out8(p, v) => push(3, p.into(), v.into()),
            Op::Write8(a, v) => push(4, a, v.into()),
            Op::Expect32(a, v) => push(5, a, v.into()),
            Op::PollIn8(p, v) => push(6, p.into(), v.into()),
            Op::Cpuid(a, leaf) => push(7, a, leaf.into()),
        }
    }
    push(0, 0, 0);
    out
}

/// Writes `text` to COM1 one byte at a time.
pub fn serial_print(text: &str) -> Vec<Op> {
    text.bytes().map(|b| Op::Out8(0x3f8, b)).collect()
}

/// The i8042 reset command: the guest's normal way to stop.
pub const RESET: Op = Op::Out8(0x64, 0xfe);

/// Opens KVM or explains in one line why the test cannot run.
pub fn kvm_or_skip() -> bool {
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            println!("SKIPPED (host cannot): /dev/kvm is not usable here: {e}");
            false
        }
    }
}

/// A spawned VMM that is killed when dropped: a failing test leaves no guest spinning.
#[derive(Debug)]
pub struct KillOnDrop(Option<std::process::Child>);

impl KillOnDrop {
    pub fn new(child: std::process::Child) -> Self {
        KillOnDrop(Some(child))
    }

    /// Sends the VMM SIGTERM.
    pub fn sigterm(&self) {
        let pid = i32::try_from(self.id()).unwrap();
        // SAFETY: signalling our own child process by its pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    }

    /// Waits up to `limit` for the VMM to exit; fails the test with `why` past that.
    pub fn exit_within(&mut self, limit: Duration, why: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "{why}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the VMM to exit by itself, collecting its output.
    pub fn wait_with_output(mut self) -> std::process::Output {
        let child = self.0.take().expect("not waited for yet");
        child.wait_with_output().unwrap()
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("not waited for yet")
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_mut().expect("not waited for yet")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A scratch file path unique to this test process.
pub fn scratch(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "kindling-vmm-test-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A one-vCPU VM whose console goes to the file `console`.
pub fn new_vm(console: &PathBuf) -> Vm {
    new_vm_with(console, 1)
}

/// A VM with `vcpu_count` vCPUs whose console goes to the file `console`.
pub fn new_vm_with(console: &PathBuf, vcpu_count: u8) -> Vm {
    new_vm_full(console, vcpu_count, None)
}

/// A VM with a CPU template.
pub fn new_vm_full(console: &PathBuf, vcpu_count: u8, cpu_template: Option<CpuTemplate>) -> Vm {
    let out = fs::File::create(console).expect("console file");
    Vm::new(VmConfig {
        cpu_template,
        vcpu_count,
        mem_size_mib: 16,
        serial: Box::new(out),
    })
    .expect("create VM")
}

/// Loads the interpreter and `script`, starts the VM at CPL3 and waits for it to stop
/// (at most `limit`; then the VM is stopped with [`ExitReason::Stopped`]).
pub fn run_script(vm: Vm, script: &[Op], limit: Duration) -> (ExitReason, Timings) {
    load(vm.memory(), script);
    let entry = EntryPoint {
        rip: CODE_ADDR,
        rsp: STACK_TOP,
        rsi: SCRIPT_ADDR,
        user_mode: true,
    };
    let running = vm.start(entry, Instant::now()).expect("start VM");
    watchdog(running.exit().clone(), limit);
    running.wait()
}

fn load(mem: &GuestMemory, script: &[Op]) {
    mem.write_slice(&INTERPRETER, GuestAddress(CODE_ADDR))
        .unwrap();
    let bytes = encode(script);
    assert!(bytes.len() < 0xf000, "script too long");
    mem.write_slice(&bytes, GuestAddress(SCRIPT_ADDR)).unwrap();
}

fn watchdog(exit: VmExit, limit: Duration) {
    thread::spawn(move || {
        thread::sleep(limit);
        exit.request(ExitReason::Stopped);
    });
}

/// virtio-mmio register offsets the scripts use (virtio 1.2 §4.2.2).
pub mod mmio {
    pub const MAGIC: u64 = 0x00;
    pub const VERSION: u64 = 0x04;
    pub const DEVICE_ID: u64 = 0x08;
    pub const DEVICE_FEATURES: u64 = 0x10;
    pub const DEVICE_FEATURES_SEL: u64 = 0x14;
    pub const DRIVER_FEATURES: u64 = 0x20;
    pub const DRIVER_FEATURES_SEL: u64 = 0x24;
    pub const QUEUE_SEL: u64 = 0x30;
    pub const QUEUE_NUM_MAX: u64 = 0x34;
    pub const QUEUE_NUM: u64 = 0x38;
    pub const QUEUE_READY: u64 = 0x44;
    pub const QUEUE_NOTIFY: u64 = 0x50;
    pub const INTERRUPT_STATUS: u64 = 0x60;
    pub const INTERRUPT_ACK: u64 = 0x64;
    pub const STATUS: u64 = 0x70;
    pub const QUEUE_DESC: u64 = 0x80;
    pub const QUEUE_AVAIL: u64 = 0x90;
    pub const QUEUE_USED: u64 = 0xa0;
    pub const CONFIG: u64 = 0x100;
}

/// The driver side of device initialisation (virtio 1.2 §3.1.1), done by the guest through
/// MMIO exits: check the device, negotiate `features`, and check FEATURES_OK stuck.
pub fn virtio_negotiate(base: u64, device_id: u32, features: u64) -> Vec<Op> {
    use mmio::*;
    vec![
        Op::Expect32(base + MAGIC, 0x7472_6976),
        Op::Expect32(base + VERSION, 2),
        Op::Expect32(base + DEVICE_ID, device_id),
        Op::Write32(base + STATUS, 0),
        Op::Write32(base + STATUS, 1),
        Op::Write32(base + STATUS, 3),
        Op::Write32(base + DEVICE_FEATURES_SEL, 1),
        Op::Expect32(base + DEVICE_FEATURES, 1), // VIRTIO_F_VERSION_1 is offered
        Op::Write32(base + DRIVER_FEATURES_SEL, 0),
        Op::Write32(base + DRIVER_FEATURES, (features & 0xffff_ffff) as u32),
        Op::Write32(base + DRIVER_FEATURES_SEL, 1),
        Op::Write32(base + DRIVER_FEATURES, (features >> 32) as u32),
        Op::Write32(base + STATUS, 0xb),
    ]
}

/// Sets up queue `index` of size `size` at the given guest addresses and marks it ready.
pub fn virtio_queue_setup(
    base: u64,
    index: u32,
    size: u32,
    desc: u64,
    avail: u64,
    used: u64,
) -> Vec<Op> {
    use mmio::*;
    vec![
        Op::Write32(base + QUEUE_SEL, index),
        Op::Write32(base + QUEUE_NUM, size),
        Op::Write32(base + QUEUE_DESC, (desc & 0xffff_ffff) as u32),
        Op::Write32(base + QUEUE_DESC + 4, (desc >> 32) as u32),
        Op::Write32(base + QUEUE_AVAIL, (avail & 0xffff_ffff) as u32),
        Op::Write32(base + QUEUE_AVAIL + 4, (avail >> 32) as u32),
        Op::Write32(base + QUEUE_USED, (used & 0xffff_ffff) as u32),
        Op::Write32(base + QUEUE_USED + 4, (used >> 32) as u32),
        Op::Write32(base + QUEUE_READY, 1),
    ]
}

/// Writes a split-virtqueue descriptor (the driver's part of a request, in guest memory).
pub fn write_desc(
    mem: &GuestMemory,
    table: u64,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let at = table + 16 * u64::from(index);
    mem.write_obj(addr, GuestAddress(at)).unwrap();
    mem.write_obj(len, GuestAddress(at + 8)).unwrap();
    mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
    mem.write_obj(next, GuestAddress(at + 14)).unwrap();
}

/// Publishes `heads` in the available ring.
pub fn write_avail(mem: &GuestMemory, avail: u64, heads: &[u16]) {
    mem.write_obj(0u16, GuestAddress(avail)).unwrap();
    for (i, h) in heads.iter().enumerate() {
        mem.write_obj(*h, GuestAddress(avail + 4 + 2 * i as u64))
            .unwrap();
    }
    mem.write_obj(u16::try_from(heads.len()).unwrap(), GuestAddress(avail + 2))
        .unwrap();
}

/// `mov dx,0x3f8; mov al,'o'; out dx,al; mov al,'k'; out dx,al; mov al,10; out dx,al;
///  mov eax,0xd0000000; mov byte [rax],123; mov al,0xfe; out 0x64,al; l: hlt; jmp l`
pub const HELLO_KERNEL: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0xb0, 0x6f, 0xee, 0xb0, 0x6b, 0xee, 0xb0, 0x0a, 0xee, 0xb8, 0x00, 0x00,
    0x00, 0xd0, 0xc6, 0x00, 0x7b, 0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd,
];
/// A guest with a "keyboard driver": enables the i8042 keyboard interrupt, prints `r`, waits
/// for a key (Ctrl-Alt-Del) and then resets:
/// `mov al,0x60; out 0x64,al; mov al,5; out 0x60,al; mov dx,0x3f8; mov al,'r'; out dx,al;
///  mov al,10; out dx,al; w: in al,0x64; test al,1; jz w; mov al,0xfe; out 0x64,al; h: hlt; jmp h`
pub const KEYBOARD_KERNEL: &[u8] = &[
    0xb0, 0x60, 0xe6, 0x64, 0xb0, 0x05, 0xe6, 0x60, 0x66, 0xba, 0xf8, 0x03, 0xb0, 0x72, 0xee, 0xb0,
    0x0a, 0xee, 0xe4, 0x64, 0xa8, 0x01, 0x74, 0xfa, 0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd,
];
/// A guest that prints dots for ever: `mov dx,0x3f8; l: mov al,'.'; out dx,al; jmp l`.
pub const DOTS_KERNEL: &[u8] = &[0x66, 0xba, 0xf8, 0x03, 0xb0, 0x2e, 0xee, 0xeb, 0xfb];
/// `spin: jmp spin` — a guest that never stops by itself.
pub const SPIN_KERNEL: &[u8] = &[0xeb, 0xfe];

/// A minimal x86-64 ELF executable with `code` loaded (and entered) at 1 MiB.
pub fn elf_kernel(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    const CODE_OFFSET: u64 = 0x1000;
    let mut f = Vec::new();
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [64u16, 56, 1, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [
        CODE_OFFSET,
        LOAD,
        LOAD,
        code.len() as u64,
        code.len() as u64,
        0x1000,
    ] {
        f.extend_from_slice(&v.to_le_bytes()); // offset, vaddr, paddr, filesz, memsz, align
    }
    f.resize(usize::try_from(CODE_OFFSET).unwrap(), 0);
    f.extend_from_slice(code);
    f
}

/// kindling-vmm serving its API on `sock`, the guest's console in `console`, stderr piped.
pub fn api_vmm(sock: &Path, console: &Path) -> std::process::Command {
    let mut vmm = std::process::Command::new(env!("CARGO_BIN_EXE_kindling-vmm"));
    vmm.arg("--api-sock")
        .arg(sock)
        .arg("--serial-out")
        .arg(console)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    vmm
}

/// One keep-alive HTTP/1.1 client connection.
pub struct Client(BufReader<UnixStream>);

impl Client {
    pub fn connect(sock: &Path) -> Self {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match UnixStream::connect(sock) {
                Ok(s) => return Client(BufReader::new(s)),
                Err(e) if Instant::now() > deadline => panic!("API socket never came up: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    pub fn call(&mut self, method: &str, path: &str, body: Option<Value>) -> (u16, Option<Value>) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.0.get_mut().write_all(req.as_bytes()).unwrap();
        let mut status = String::new();
        self.0.read_line(&mut status).unwrap();
        let code: u16 = status.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut len = 0;
        loop {
            let mut line = String::new();
            self.0.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut buf = vec![0u8; len];
        self.0.read_exact(&mut buf).unwrap();
        (
            code,
            (len > 0).then(|| serde_json::from_slice(&buf).unwrap()),
        )
    }
}
