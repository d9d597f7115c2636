//! Closed vocabularies: enums whose every variant has exactly one spelling, shared by
//! functions.toml, the CLI and the logs, so that a new isolation or hypervisor is one line
//! here and one match arm where it is used.

/// Declares a fieldless enum with the spelling of each variant, and gives it `ALL`,
/// `name()`, `FromStr` (whose error lists the names) and `Display`.
macro_rules! closed_vocabulary {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$variant_meta:meta])* $variant:ident = $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$variant_meta])* $variant ),+
        }

        impl $name {
            /// Every variant, in the order the names are listed in errors.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The one spelling of this variant.
            pub fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $text ),+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.name() == s)
                    .ok_or_else(|| $crate::vocabulary::not_one_of(s, $name::ALL.iter().map(|v| v.name())))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

pub(crate) use closed_vocabulary;

/// `"x" is not one of "a", "b"`: the error of every closed set of names.
pub(crate) fn not_one_of<'a>(value: &str, names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<String> = names.map(|n| format!("{n:?}")).collect();
    format!("{value:?} is not one of {}", names.join(", "))
}
