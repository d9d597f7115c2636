//! Custom CPU templates in Firecracker's JSON format: bit masks over CPUID leaves, so that a
//! fleet of different hosts can present one CPU model to its guests. Each bitmap is 32
//! characters of `0` (clear), `1` (set) or `x` (keep the host's bit), most significant first,
//! optionally prefixed `0b` and separated with `_`.
//!
//! ```json
//! {"cpuid_modifiers": [{"leaf": "0x7", "subleaf": "0x0", "flags": 1,
//!   "modifiers": [{"register": "ebx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxx0xxxxx"}]}]}
//! ```
//!
//! MSR modifiers are not supported and rejected.

use std::path::Path;

use kvm_bindings::CpuId;
use serde::{Deserialize, Deserializer, Serialize};

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuTemplate {
    #[serde(default)]
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    #[serde(default, deserialize_with = "no_msr_modifiers")]
    pub msr_modifiers: Vec<serde_json::Value>,
    /// Where the template came from, for the log.
    #[serde(skip)]
    pub name: String,
}

/// The modifiers of one CPUID leaf/subleaf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidLeafModifier {
    #[serde(deserialize_with = "number")]
    pub leaf: u32,
    #[serde(deserialize_with = "number")]
    pub subleaf: u32,
    #[serde(default)]
    pub flags: u32,
    pub modifiers: Vec<RegisterModifier>,
}

/// One register's mask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterModifier {
    pub register: Register,
    #[serde(deserialize_with = "bitmap")]
    pub bitmap: Bitmap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// Bits to force: `value` where `mask` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bitmap {
    pub mask: u32,
    pub value: u32,
}

impl Bitmap {
    pub fn apply(&self, reg: u32) -> u32 {
        (reg & !self.mask) | (self.value & self.mask)
    }

    /// Parses `0b` + 32 characters of `0`, `1`, `x` (underscores ignored).
    pub fn parse(s: &str) -> Result<Self, String> {
        let digits: Vec<char> = s
            .strip_prefix("0b")
            .unwrap_or(s)
            .chars()
            .filter(|c| *c != '_')
            .collect();
        if digits.len() != 32 {
            return Err(format!(
                "bitmap {s:?} must have 32 bits, has {}",
                digits.len()
            ));
        }
        let mut b = Bitmap { mask: 0, value: 0 };
        for (i, c) in digits.iter().enumerate() {
            let bit = 1u32 << (31 - i);
            match c {
                '0' => b.mask |= bit,
                '1' => {
                    b.mask |= bit;
                    b.value |= bit;
                }
                'x' | 'X' => {}
                other => return Err(format!("bitmap {s:?}: unexpected {other:?} (0, 1 or x)")),
            }
        }
        Ok(b)
    }
}

fn bitmap<'de, D: Deserializer<'de>>(d: D) -> Result<Bitmap, D::Error> {
    Bitmap::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

fn number<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        Int(u32),
        Text(String),
    }
    match Num::deserialize(d)? {
        Num::Int(n) => Ok(n),
        Num::Text(s) => match s.strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => s.parse(),
        }
        .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a number"))),
    }
}

fn no_msr_modifiers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<serde_json::Value>, D::Error> {
    let v = Vec::<serde_json::Value>::deserialize(d)?;
    if v.is_empty() {
        Ok(v)
    } else {
        Err(serde::de::Error::custom("msr_modifiers are not supported"))
    }
}

impl CpuTemplate {
    /// Parses a template; `name` is what the log calls it.
    pub fn from_json(json: &[u8], name: &str) -> Result<Self, String> {
        let mut t: CpuTemplate =
            serde_json::from_slice(json).map_err(|e| format!("invalid CPU template: {e}"))?;
        t.name = name.to_string();
        Ok(t)
    }

    /// Reads a template file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let json = std::fs::read(path)
            .map_err(|e| format!("reading CPU template {}: {e}", path.display()))?;
        Self::from_json(&json, &path.display().to_string())
    }

    /// Applies the masks to `cpuid`. A leaf/subleaf the host does not report is an error:
    /// the template was written for another CPU.
    pub fn apply(&self, cpuid: &mut CpuId) -> Result<(), String> {
        for leaf in &self.cpuid_modifiers {
            let entry = cpuid
                .as_mut_slice()
                .iter_mut()
                .find(|e| e.function == leaf.leaf && e.index == leaf.subleaf)
                .ok_or_else(|| {
                    format!(
                        "CPU template {}: leaf {:#x} subleaf {:#x} is not offered by this host",
                        self.name, leaf.leaf, leaf.subleaf
                    )
                })?;
            for m in &leaf.modifiers {
                let reg = match m.register {
                    Register::Eax => &mut entry.eax,
                    Register::Ebx => &mut entry.ebx,
                    Register::Ecx => &mut entry.ecx,
                    Register::Edx => &mut entry.edx,
                };
                *reg = m.bitmap.apply(*reg);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn bitmaps_parse_and_apply() {
        let b = Bitmap::parse("0b1111_0000_xxxx_xxxx_xxxx_xxxx_xxxx_xx01").unwrap();
        assert_eq!(b.apply(0x0f0f_ffff), 0xf00f_fffd);
        assert_eq!(b.apply(0), 0xf000_0001);
        assert!(Bitmap::parse("0b101").unwrap_err().contains("32 bits"));
        assert!(Bitmap::parse(&"2".repeat(32))
            .unwrap_err()
            .contains("unexpected"));
    }

    #[test]
    fn template_masks_leaves_and_rejects_what_it_cannot_do() {
        let json = br#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": 0, "flags": 0, "modifiers": [
            {"register": "ecx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0"},
            {"register": "edx", "bitmap": "0b1xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]}], "msr_modifiers": []}"#;
        let t = CpuTemplate::from_json(json, "t").unwrap();
        let mut cpuid = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 1,
            ecx: 0xffff_ffff,
            edx: 0,
            ..Default::default()
        }])
        .unwrap();
        t.apply(&mut cpuid).unwrap();
        let e = cpuid.as_slice()[0];
        assert_eq!((e.ecx, e.edx), (0xffff_fffe, 0x8000_0000));

        let other = br#"{"cpuid_modifiers": [{"leaf": "0x7", "subleaf": "0x0", "modifiers": []}]}"#;
        let err = CpuTemplate::from_json(other, "other")
            .unwrap()
            .apply(&mut cpuid)
            .unwrap_err();
        assert!(err.contains("leaf 0x7"), "{err}");
        let msr = br#"{"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b0"}]}"#;
        assert!(CpuTemplate::from_json(msr, "m")
            .unwrap_err()
            .contains("msr_modifiers"));
        let bad = br#"{"cpuid_modifiers": [{"leaf": "zz", "subleaf": 0, "modifiers": []}]}"#;
        assert!(CpuTemplate::from_json(bad, "b")
            .unwrap_err()
            .contains("not a number"));
    }
}
