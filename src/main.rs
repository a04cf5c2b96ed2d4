//! The `buildbus` binary: everything is in the library's `cli` module.

fn main() -> std::process::ExitCode {
    buildbus::cli::main()
}
