//! Rebuilds when a migration changes: `refinery::embed_migrations!` reads
//! the files at compile time, and cargo would not notice them otherwise.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
