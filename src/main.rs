//! The `baton` binary: selects the mode. (Lambda mode, when `AWS_LAMBDA_RUNTIME_API` is set,
//! arrives with the AWS adapters; until then the binary is the CLI.)

fn main() -> std::process::ExitCode {
    baton::cli::main()
}
