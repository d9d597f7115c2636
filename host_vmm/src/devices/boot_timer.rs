//! The boot timer (Firecracker's convention): the guest's init writes the byte 123 to the first
//! byte of a 4 KiB MMIO page once it reaches userspace, and the VMM records how long that took
//! since the instance was started.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::bus::BusDevice;
use crate::layout::BOOT_TIMER_MAGIC;

/// When the guest reported reaching userspace, relative to instance start.
pub type BootTime = Arc<OnceLock<Duration>>;

/// The boot-timer MMIO page.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    reached: BootTime,
}

impl BootTimer {
    /// A timer counting from `start`; the measured time appears in `reached`.
    pub fn new(start: Instant, reached: BootTime) -> Self {
        Self { start, reached }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&BOOT_TIMER_MAGIC) {
            let elapsed = self.start.elapsed();
            if self.reached.set(elapsed).is_ok() {
                tracing::info!(
                    "guest boot completed after {} us (boot timer)",
                    elapsed.as_micros()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_magic_byte_at_offset_zero_counts() {
        let reached = BootTime::default();
        let mut timer = BootTimer::new(Instant::now(), reached.clone());
        timer.write(1, &[BOOT_TIMER_MAGIC]);
        timer.write(0, &[1]);
        assert!(reached.get().is_none());
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        let first = *reached.get().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(*reached.get().unwrap(), first);
    }
}
