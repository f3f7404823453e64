//! capstan-state
