//! The kernel's mount tables (`/proc/self/mounts`, `/proc/self/mountinfo`) write a space,
//! tab, newline or backslash in a path as a `\ooo` octal escape, so that fields stay
//! separated by spaces; [`unescape`] turns a field back into the path.

/// Undoes the `\ooo` escapes of one field of a mount table.
pub fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        // Three octal digits, at most `\377`: one byte.
        match bytes.get(i..i + 4) {
            Some(&[b'\\', a @ b'0'..=b'3', b @ b'0'..=b'7', c @ b'0'..=b'7']) => {
                out.push(((a - b'0') << 6) | ((b - b'0') << 3) | (c - b'0'));
                i += 4;
            }
            _ => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undoes_the_kernels_escapes() {
        assert_eq!(unescape("/mnt/my\\040disk"), "/mnt/my disk");
        assert_eq!(unescape("a\\011b\\012c\\134d"), "a\tb\nc\\d");
        assert_eq!(unescape("/plain/path"), "/plain/path");
    }

    #[test]
    fn leaves_what_is_not_a_three_digit_octal_escape() {
        assert_eq!(unescape("a\\04"), "a\\04");
        assert_eq!(unescape("a\\+12"), "a\\+12");
        assert_eq!(unescape("a\\400"), "a\\400");
        assert_eq!(unescape("a\\"), "a\\");
    }
}
