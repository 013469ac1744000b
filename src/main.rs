//! The `baton` binary selects its mode: a Lambda bootstrap when `AWS_LAMBDA_RUNTIME_API` is set
//! (`lambda_runtime::run` panics without it), the CLI otherwise.

fn main() -> std::process::ExitCode {
    if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() {
        return baton::lambda::main();
    }
    baton::cli::main()
}
