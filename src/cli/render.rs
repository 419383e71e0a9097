//! How commands print: aligned tables for people, JSON for programs.

use serde::Serialize;

use crate::registry::{self, Organization};
use crate::tenants::placement::PlacedOrg;

pub(super) fn cell_text(v: Option<&serde_json::Value>) -> String {
    match v {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

pub(super) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Prints a new token; its secret is shown this once.
pub(super) fn print_issued(
    user: &registry::User,
    issued: &registry::IssuedToken,
    label: &str,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return print_json(&serde_json::json!({ "user": user, "token": issued }));
    }
    println!("{label} (id {}):", issued.info.id);
    println!("{}", issued.token);
    println!("store it now: it is shown once and cannot be recovered");
    Ok(())
}

pub(super) fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub(super) fn print_org(org: &Organization, json: bool) -> anyhow::Result<()> {
    if json {
        print_json(org)
    } else {
        print_orgs(std::slice::from_ref(org));
        Ok(())
    }
}

pub(super) fn print_orgs(orgs: &[Organization]) {
    let placed: Vec<PlacedOrg> = orgs
        .iter()
        .map(|o| PlacedOrg {
            organization: o.clone(),
            node: None,
        })
        .collect();
    OrgTable::default().rows(&placed);
}

/// Prints organizations as a table, a batch at a time (widths are set by
/// the first batch); a NODE column when the first batch has nodes (Citus).
#[derive(Default)]
pub(super) struct OrgTable(Option<(TableWriter, bool)>);

impl OrgTable {
    pub(super) fn rows(&mut self, orgs: &[PlacedOrg]) {
        let (table, with_node) = self.0.get_or_insert_with(|| {
            let with_node = orgs.iter().any(|o| o.node.is_some());
            let mut header = vec!["SLUG", "NAME", "SCHEMA", "STATUS", "VERSION", "CREATED"];
            if with_node {
                header.push("NODE");
            }
            (TableWriter::new(&header), with_node)
        });
        let rows: Vec<Vec<String>> = orgs
            .iter()
            .map(|p| {
                let o = &p.organization;
                let mut row = vec![
                    o.slug.to_string(),
                    o.name.clone(),
                    o.schema_name.to_string(),
                    o.status.to_string(),
                    o.template_version.to_string(),
                    o.created_at
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default(),
                ];
                if *with_node {
                    row.push(p.node.clone().unwrap_or_else(|| "-".into()));
                }
                row
            })
            .collect();
        table.rows(&rows);
    }
}

/// Prints a JSON array an element at a time.
#[derive(Default)]
pub(super) struct JsonArrayWriter {
    started: bool,
}

impl JsonArrayWriter {
    pub(super) fn items<T: Serialize>(&mut self, items: &[T]) -> anyhow::Result<()> {
        for item in items {
            let text = serde_json::to_string_pretty(item)?;
            let indented = text.replace('\n', "\n  ");
            if self.started {
                println!(",\n  {indented}");
            } else {
                println!("[\n  {indented}");
                self.started = true;
            }
        }
        Ok(())
    }

    pub(super) fn finish(self) {
        if self.started {
            println!("]");
        } else {
            println!("[]");
        }
    }
}

/// Prints left-aligned columns separated by two spaces.
pub fn print_table<R: AsRef<[String]>>(header: &[&str], rows: &[R]) {
    TableWriter::new(header).rows(rows);
}

/// A table printed in batches: the header and column widths come with the
/// first batch; a longer cell later widens only its own line.
pub(super) struct TableWriter {
    header: Vec<String>,
    widths: Option<Vec<usize>>,
}

impl TableWriter {
    pub(super) fn new(header: &[&str]) -> Self {
        TableWriter {
            header: header.iter().map(|h| h.to_string()).collect(),
            widths: None,
        }
    }

    pub(super) fn rows<R: AsRef<[String]>>(&mut self, rows: &[R]) {
        let widths = match &self.widths {
            Some(w) => w.clone(),
            None => {
                let mut w: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
                for row in rows {
                    for (w, cell) in w.iter_mut().zip(row.as_ref()) {
                        *w = (*w).max(cell.chars().count());
                    }
                }
                print_line(&self.header, &w);
                self.widths = Some(w.clone());
                w
            }
        };
        for row in rows {
            print_line(row.as_ref(), &widths);
        }
    }
}

fn print_line(cells: &[String], widths: &[usize]) {
    let padded: Vec<String> = cells
        .iter()
        .zip(widths)
        .map(|(c, w)| format!("{c:<w$}"))
        .collect();
    println!("{}", padded.join("  ").trim_end());
}
