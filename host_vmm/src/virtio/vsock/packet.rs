//! The virtio-vsock packet header (virtio 1.2 §5.10.6) and its operation codes.

use vm_memory::ByteValued;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type supported.
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// The CID of the host.
pub const HOST_CID: u64 = 2;

/// The 44-byte little-endian header in front of every vsock packet.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Size of [`Header`] on the wire.
pub const HEADER_LEN: usize = std::mem::size_of::<Header>();

// SAFETY: `Header` is plain integers with `repr(C, packed)`: no padding, and every bit
// pattern is a valid value, as `ByteValued` requires. (x86-64 is little-endian, like the wire.)
unsafe impl ByteValued for Header {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_44_bytes_in_wire_order() {
        assert_eq!(HEADER_LEN, 44);
        let h = Header {
            src_cid: 3,
            dst_port: 0x0102_0304,
            op: OP_RW,
            ..Default::default()
        };
        let bytes = h.as_slice();
        assert_eq!(bytes[0], 3);
        assert_eq!(&bytes[20..24], &[4, 3, 2, 1]);
        assert_eq!(&bytes[30..32], &[5, 0]);
    }
}
