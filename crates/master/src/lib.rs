//! capstan-master
