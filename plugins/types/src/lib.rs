//! The `types` test plugin: one identity function per WIT value kind.

callme_guest::generate!();

struct Types;

impl Guest for Types {
    fn echo_bool(x: bool) -> bool {
        x
    }
    fn echo_s8(x: i8) -> i8 {
        x
    }
    fn echo_s16(x: i16) -> i16 {
        x
    }
    fn echo_s32(x: i32) -> i32 {
        x
    }
    fn echo_s64(x: i64) -> i64 {
        x
    }
    fn echo_u8(x: u8) -> u8 {
        x
    }
    fn echo_u16(x: u16) -> u16 {
        x
    }
    fn echo_u32(x: u32) -> u32 {
        x
    }
    fn echo_u64(x: u64) -> u64 {
        x
    }
    fn echo_f32(x: f32) -> f32 {
        x
    }
    fn echo_f64(x: f64) -> f64 {
        x
    }
    fn echo_char(x: char) -> char {
        x
    }
    fn echo_string(x: String) -> String {
        x
    }
    fn echo_list(x: Vec<i32>) -> Vec<i32> {
        x
    }
    fn echo_bytes(x: Vec<u8>) -> Vec<u8> {
        x
    }
    fn echo_tuple(x: (i32, String, bool)) -> (i32, String, bool) {
        x
    }
    fn echo_record(x: Point) -> Point {
        x
    }
    fn echo_variant(x: Shape) -> Shape {
        x
    }
    fn echo_enum(x: Color) -> Color {
        x
    }
    fn echo_flags(x: Perms) -> Perms {
        x
    }
    fn echo_option(x: Option<String>) -> Option<String> {
        x
    }
    fn echo_result(x: Result<i32, String>) -> Result<i32, String> {
        x
    }
    fn echo_nested(x: Vec<Option<Point>>) -> Vec<Option<Point>> {
        x
    }
    fn describe_point(p: Point, scale: i32) -> String {
        format!(
            "{}@({},{})",
            p.label,
            p.x.wrapping_mul(scale),
            p.y.wrapping_mul(scale)
        )
    }
}

export!(Types);
