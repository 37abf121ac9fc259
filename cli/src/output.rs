//! Output formats shared by the commands.

/// `-o/--output`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Format {
    /// For people.
    #[default]
    Text,
    /// One JSON document (or one per line for streams).
    Json,
}
