//! capstan-api
