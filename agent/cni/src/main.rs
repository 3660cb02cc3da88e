//! `weft-cni`: the chained CNI plugin. All logic lives in the `weft_cni` library.

#![forbid(unsafe_code)]

use std::io::Read;
use std::process::ExitCode;

use weft_cni::{self as cni, CniEnv, SocketAgent};

fn main() -> ExitCode {
    let mut stdin = String::new();
    let result = std::io::stdin()
        .read_to_string(&mut stdin)
        .map_err(|e| cni::CniError::new(cni::code::IO_FAILURE, "cannot read stdin", e.to_string()))
        .and_then(|_| CniEnv::from_vars(|name| std::env::var(name).ok()))
        .and_then(|env| cni::run(&env, &stdin, &mut SocketAgent));
    match result {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(error) => {
            // The spec wants the error on stdout; stderr helps whoever runs us by hand.
            println!("{}", error.to_json(&cni::error_version(&stdin)));
            eprintln!("weft-cni: {error}: {}", error.details);
            ExitCode::FAILURE
        }
    }
}
