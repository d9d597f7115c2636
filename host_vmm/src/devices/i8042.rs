//! The i8042 keyboard controller, as much of it as a microVM needs (Firecracker's scope):
//! the guest's reset command (`reboot=k` writes 0xFE to port 0x64) stops the VM with
//! [`ExitReason::GuestReset`], and the host can press Ctrl-Alt-Del so that a guest with an
//! i8042 keyboard driver (`i8042.dumbkbd` recommended) shuts down cleanly. The controller
//! answers the commands Linux's i8042 driver uses (CTR and output-port access, self test);
//! vm-superio's i8042 only knows the reset, hence this device.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use vm_superio::Trigger;

use super::IrqLine;
use crate::bus::BusDevice;
use crate::exit::{ExitReason, VmExit};

const DATA: u64 = 0;
const COMMAND: u64 = 4;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;
const SELF_TEST_OK: u8 = 0x55;

const SB_OUT_DATA_AVAIL: u8 = 0x01;
const SB_SYS_FLAG: u8 = 0x04;
const SB_CMD_DATA: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

/// Control register: keyboard interrupt enable.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYS_FLAG: u8 = 0x04;

/// Scan code set 2: Ctrl, Alt, Del (extended) make codes.
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];
const BUF_SIZE: usize = 16;

/// The controller on ports 0x60..=0x64.
#[derive(Debug)]
pub struct I8042 {
    exit: VmExit,
    kbd_irq: IrqLine,
    status: u8,
    ctr: u8,
    outp: u8,
    /// A command waiting for its data byte on port 0x60.
    pending: Option<u8>,
    out: VecDeque<u8>,
}

impl I8042 {
    pub fn new(exit: VmExit, kbd_irq: IrqLine) -> Self {
        Self {
            exit,
            kbd_irq,
            status: SB_SYS_FLAG | SB_KBD_ENABLED,
            ctr: CTR_SYS_FLAG,
            outp: 0,
            pending: None,
            out: VecDeque::new(),
        }
    }

    /// The controller's registers and unread output, for a snapshot.
    pub fn state(&self) -> I8042State {
        I8042State {
            status: self.status,
            ctr: self.ctr,
            outp: self.outp,
            pending: self.pending,
            out: self.out.iter().copied().collect(),
        }
    }

    /// The controller as a snapshot left it (bytes the guest had not read are for the VM to
    /// signal again: [`I8042State::interrupt_pending`]).
    pub fn from_state(exit: VmExit, kbd_irq: IrqLine, state: &I8042State) -> Result<Self, String> {
        if state.out.len() > BUF_SIZE {
            return Err(format!(
                "i8042: {} buffered bytes (the controller holds {BUF_SIZE})",
                state.out.len()
            ));
        }
        Ok(Self {
            exit,
            kbd_irq,
            status: state.status,
            ctr: state.ctr,
            outp: state.outp,
            pending: state.pending,
            out: state.out.iter().copied().collect(),
        })
    }

    fn push(&mut self, byte: u8) -> bool {
        if self.out.len() >= BUF_SIZE {
            return false;
        }
        self.out.push_back(byte);
        self.status |= SB_OUT_DATA_AVAIL;
        true
    }

    /// Whether the guest's keyboard driver listens (enabled keyboard interrupts).
    pub fn keyboard_listens(&self) -> bool {
        self.ctr & CTR_KBD_INT != 0
    }

    /// Queues Ctrl-Alt-Del and raises the keyboard IRQ. Returns false when the guest has no
    /// keyboard driver listening or the buffer is full, so the caller can stop the VM instead.
    pub fn ctrl_alt_del(&mut self) -> bool {
        if !self.keyboard_listens() || self.out.len() + CTRL_ALT_DEL.len() > BUF_SIZE {
            return false;
        }
        CTRL_ALT_DEL.iter().for_each(|&b| {
            self.push(b);
        });
        self.interrupt();
        true
    }

    /// Raises the keyboard IRQ. Linux's i8042 driver reads one byte per interrupt, so every
    /// byte of a multi-byte sequence needs an interrupt of its own.
    fn interrupt(&self) {
        if let Err(e) = self.kbd_irq.trigger() {
            tracing::warn!("i8042 interrupt failed: {e}");
        }
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_CMD_DATA;
        match cmd {
            CMD_READ_CTR => {
                self.push(self.ctr);
            }
            CMD_READ_OUTP => {
                self.push(self.outp);
            }
            CMD_SELF_TEST => {
                self.push(SELF_TEST_OK);
            }
            CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending = Some(cmd),
            CMD_RESET_CPU => self.exit.request(ExitReason::GuestReset),
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !SB_CMD_DATA;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = value,
            Some(CMD_WRITE_OUTP) => self.outp = value,
            // Keyboard commands: ignored, like a keyboard that is not there (`dumbkbd`).
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let [byte] = data else {
            data.fill(0);
            return;
        };
        *byte = match offset {
            DATA => {
                let b = self.out.pop_front().unwrap_or(0);
                if self.out.is_empty() {
                    self.status &= !SB_OUT_DATA_AVAIL;
                } else if self.keyboard_listens() {
                    self.interrupt();
                }
                b
            }
            COMMAND => self.status,
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (COMMAND, [cmd]) => self.command(*cmd),
            (DATA, [value]) => self.data(*value),
            _ => {}
        }
    }
}

/// An i8042's state in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    status: u8,
    ctr: u8,
    outp: u8,
    pending: Option<u8>,
    out: Vec<u8>,
}

impl I8042State {
    /// Whether bytes wait for a listening keyboard driver, which reads one per interrupt.
    pub fn interrupt_pending(&self) -> bool {
        !self.out.is_empty() && self.ctr & CTR_KBD_INT != 0
    }
}

/// A handle that presses Ctrl-Alt-Del on a running VM's i8042.
#[derive(Clone, Debug)]
pub struct CtrlAltDel(pub std::sync::Arc<std::sync::Mutex<I8042>>);

impl CtrlAltDel {
    /// See [`I8042::ctrl_alt_del`].
    pub fn press(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ctrl_alt_del()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn device() -> (I8042, VmExit) {
        let exit = VmExit::new().unwrap();
        let irq = IrqLine(EventFd::new(EFD_NONBLOCK).unwrap());
        (I8042::new(exit.clone(), irq), exit)
    }

    fn read(dev: &mut I8042, port: u64) -> u8 {
        let mut b = [0u8];
        dev.read(port, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_requests_guest_reset() {
        let (mut dev, exit) = device();
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        dev.write(DATA, &[0xfe]);
        assert_eq!(exit.reason(), None);
        dev.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
    }

    #[test]
    fn linux_driver_commands_and_ctrl_alt_del() {
        let (mut dev, _) = device();
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        assert_ne!(read(&mut dev, COMMAND) & SB_OUT_DATA_AVAIL, 0);
        assert_eq!(read(&mut dev, DATA), SELF_TEST_OK);
        assert_eq!(read(&mut dev, COMMAND) & SB_OUT_DATA_AVAIL, 0);

        assert!(!dev.ctrl_alt_del(), "no keyboard driver listens yet");
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[CTR_KBD_INT | CTR_SYS_FLAG]);
        dev.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA), CTR_KBD_INT | CTR_SYS_FLAG);

        assert!(dev.ctrl_alt_del());
        assert_eq!(
            dev.kbd_irq.0.read().unwrap(),
            1,
            "the keyboard IRQ was raised"
        );
        // One interrupt per byte: the driver reads a byte per interrupt, so each read that
        // leaves bytes behind raises the next one.
        let mut keys = vec![read(&mut dev, DATA)];
        for _ in 1..CTRL_ALT_DEL.len() {
            assert_eq!(dev.kbd_irq.0.read().unwrap(), 1, "IRQ for the next byte");
            keys.push(read(&mut dev, DATA));
        }
        assert_eq!(keys, CTRL_ALT_DEL);
        assert!(
            dev.kbd_irq.0.read().is_err(),
            "no interrupt once the buffer is empty"
        );
        for _ in 0..4 {
            assert!(dev.ctrl_alt_del());
        }
        assert!(!dev.ctrl_alt_del(), "a full buffer refuses more keys");
    }

    #[test]
    fn state_round_trips_and_unread_keys_want_their_interrupt() {
        let (mut dev, exit) = device();
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[CTR_KBD_INT | CTR_SYS_FLAG]);
        assert!(dev.ctrl_alt_del());
        let state = dev.state();
        let irq = IrqLine(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut restored = I8042::from_state(exit.clone(), irq, &state).unwrap();
        assert_eq!(restored.state(), state);
        assert!(
            state.interrupt_pending(),
            "unread keys want their interrupt again"
        );
        assert_eq!(read(&mut restored, DATA), CTRL_ALT_DEL[0]);

        let mut oversized = state;
        oversized.out = vec![0; BUF_SIZE + 1];
        let irq = IrqLine(EventFd::new(EFD_NONBLOCK).unwrap());
        assert!(I8042::from_state(exit, irq, &oversized).is_err());
    }
}
