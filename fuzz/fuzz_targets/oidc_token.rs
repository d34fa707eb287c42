//! See `ztgate::fuzzing::oidc_token` for the input format and the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ztgate::fuzzing::oidc_token(data));
