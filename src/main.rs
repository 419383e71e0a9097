//! The `tenantry` binary: parses the command line and hands over to `cli`.

fn main() -> std::process::ExitCode {
    tenantry::cli::main()
}
