//! See `ztgate::fuzzing::impersonate_extra` for the input format and the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ztgate::fuzzing::impersonate_extra(data));
