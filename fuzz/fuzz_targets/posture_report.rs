//! See `ztgate::fuzzing::posture_report` for the input format and the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ztgate::fuzzing::posture_report(data));
