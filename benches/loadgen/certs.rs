//! `certs DIR`: a throwaway CA (`ca.pem`) and the origin's certificate for `localhost`
//! (`origin.pem`, `origin.key`), for the benchmark's TLS origin and its clients.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

pub fn write(dir: &Path) -> Result<(), String> {
    let fail = |e: rcgen::Error| e.to_string();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "egress-proxy side-by-side CA");
    let ca_key = KeyPair::generate().map_err(fail)?;
    let ca = ca_params.self_signed(&ca_key).map_err(fail)?;

    let mut origin_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).map_err(fail)?;
    origin_params.distinguished_name.push(DnType::CommonName, "localhost");
    let origin_key = KeyPair::generate().map_err(fail)?;
    let origin = origin_params.signed_by(&origin_key, &ca, &ca_key).map_err(fail)?;

    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    for (name, text) in [("ca.pem", ca.pem()), ("origin.pem", origin.pem()), ("origin.key", origin_key.serialize_pem())]
    {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
