//! Error chains for logs.
