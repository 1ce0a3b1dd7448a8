//! `wanmig`: the migration engine and its command-line interface.
fn main() {
    println!("wanmig {}", env!("CARGO_PKG_VERSION"));
}
