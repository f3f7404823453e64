//! capstan-containerizer
