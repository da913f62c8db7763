//! Test certificates made with the `openssl` command: a CA, and a server and a client
//! certificate it signed, both for 127.0.0.1 (etcd's and the Consul simulator's TLS tests).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// `ca.pem`, `server.pem`/`server.key` and `client.pem`/`client.key` in `dir`.
#[derive(Debug, Clone)]
pub struct TestPki {
    pub dir: PathBuf,
}

impl TestPki {
    /// Makes a CA and a server and a client certificate (for 127.0.0.1) in `dir` with openssl.
    pub fn generate(dir: &Path) -> Result<TestPki> {
        let run = |args: &[&str]| -> Result<()> {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .context("openssl is needed by this test: apt-get install -y openssl")?;
            if !output.status.success() {
                bail!(
                    "openssl {args:?} failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            Ok(())
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-subj",
            "/CN=embassy-test-ca",
            "-days",
            "2",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        run(&ca)?;
        std::fs::write(
            dir.join("leaf.ext"),
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n\
             basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n",
        )?;
        for name in ["server", "client"] {
            let (key, csr, pem, subject) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("/CN={name}"),
            );
            let mut request = vec!["req"];
            request.extend(ec);
            request.extend(["-subj", &subject, "-keyout", &key, "-out", &csr]);
            run(&request)?;
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &pem,
                "-extfile",
                "leaf.ext",
            ])?;
        }
        Ok(TestPki {
            dir: dir.to_path_buf(),
        })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}
