//! `outbox`: operate a transactional outbox from the command line.
//! Everything happens in [`outbox::cli`]; see `outbox --help`.

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    runtime.block_on(outbox::cli::main())
}
