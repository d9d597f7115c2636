//! The VMM's own memory footprint: resident set size without guest RAM, read from
//! `/proc/self/smaps` (guest RAM is the mappings that back the guest memory regions).

use std::io;

/// Sum of `Rss:` over every mapping in `smaps` whose start address is not in `excluded`.
pub fn rss_excluding(smaps: &str, excluded: &[u64]) -> u64 {
    let mut total = 0;
    let mut skip = false;
    for line in smaps.lines() {
        if let Some(range) = line.split_whitespace().next().filter(|w| w.contains('-')) {
            if let Some(Ok(start)) = range.split('-').next().map(|s| u64::from_str_radix(s, 16)) {
                skip = excluded.contains(&start);
                continue;
            }
        }
        if let Some(kib) = line.strip_prefix("Rss:") {
            if !skip {
                total += kib
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    total
}

/// This process's RSS in KiB, without the mappings starting at `guest_regions`.
pub fn vmm_rss_kib(guest_regions: &[u64]) -> io::Result<u64> {
    Ok(rss_excluding(
        &std::fs::read_to_string("/proc/self/smaps")?,
        guest_regions,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_mappings_are_left_out() {
        let smaps = "\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0\n\
Size:               1024 kB\n\
Rss:                 512 kB\n\
55d000000000-55d000001000 r-xp 00000000 08:01 42 /usr/bin/kindling-vmm\n\
Rss:                   4 kB\n\
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n\
Rss:                  12 kB\n";
        assert_eq!(rss_excluding(smaps, &[]), 528);
        assert_eq!(rss_excluding(smaps, &[0x7f00_0000_0000]), 16);
        let own = vmm_rss_kib(&[]).unwrap();
        assert!(own > 100, "a live process has some RSS: {own}");
    }
}
