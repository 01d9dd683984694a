//! `endofm`: the coordinator (`endofm coordinator`) and the user's command line (submit, jobs,
//! status, logs, cancel, wait, up, bench). It never links libtorch or FFmpeg: everything that
//! computes runs in `endofm-worker`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
