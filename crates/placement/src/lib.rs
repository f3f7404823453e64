//! capstan-placement
