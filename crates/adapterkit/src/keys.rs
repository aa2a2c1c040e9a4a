//! Typed parameter keys: every tensor a task owns carries its checkpoint name and what it is, set by
//! the code that creates it (from the base's typed modules, the adapter and head configurations),
//! so weight decay, the frozen-prefix cache and the ownership rule read the role, never the name.

use std::borrow::Borrow;
use std::fmt;

/// What a parameter is, for the rules that treat kinds of parameters differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A tensor of an adapter in transformer layer `layer`.
    Adapter {
        /// The layer the adapter sits in.
        layer: usize,
    },
    /// A tensor of the task head.
    Head,
    /// A LayerNorm scale or shift of transformer layer `layer`, or of the embeddings (`None`).
    LayerNorm {
        /// The layer; `None` for the embeddings' LayerNorm.
        layer: Option<usize>,
    },
    /// Any other tensor of transformer layer `layer` (projections and their biases).
    LayerWeight {
        /// The layer.
        layer: usize,
    },
    /// An embedding table (word, position, segment).
    Embedding,
    /// The checkpoint's pooler (dense layer over the [CLS] state).
    Pooler,
}

impl Role {
    /// The lowest encoder layer whose output a change of this parameter alters (0 for embedding
    /// parameters); `None` for the head and pooler, which run after the encoder.
    pub fn first_layer_changed(self) -> Option<usize> {
        match self {
            Role::Adapter { layer } | Role::LayerWeight { layer } => Some(layer),
            Role::LayerNorm { layer } => Some(layer.unwrap_or(0)),
            Role::Embedding => Some(0),
            Role::Head | Role::Pooler => None,
        }
    }
}

/// The shape class of a parameter, for weight decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Leaf {
    /// A weight matrix or embedding table: decayed.
    Weight,
    /// A bias: not decayed.
    Bias,
    /// A LayerNorm scale or shift (the base's or an adapter's own): not decayed.
    Norm,
    /// A trained output scaling of an adapter: not decayed.
    Scale,
}

/// A parameter's checkpoint name (without `bert.`) with its role and leaf kind. Ordered, compared
/// and hashed by name alone, so maps keyed by it are looked up with `&str`.
#[derive(Debug, Clone)]
pub struct ParamKey {
    name: String,
    role: Role,
    leaf: Leaf,
}

impl ParamKey {
    /// A key for the tensor named `name`.
    pub fn new(name: impl Into<String>, role: Role, leaf: Leaf) -> Self {
        ParamKey {
            name: name.into(),
            role,
            leaf,
        }
    }

    /// The checkpoint name (without the `bert.` prefix).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the parameter is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Its shape class.
    pub fn leaf(&self) -> Leaf {
        self.leaf
    }

    /// Whether decoupled weight decay applies (weight matrices and embedding tables only).
    pub fn decays(&self) -> bool {
        self.leaf == Leaf::Weight
    }
}

impl PartialEq for ParamKey {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for ParamKey {}

impl PartialOrd for ParamKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ParamKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.name.cmp(&other.name)
    }
}

impl std::hash::Hash for ParamKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl Borrow<str> for ParamKey {
    fn borrow(&self) -> &str {
        &self.name
    }
}

impl Borrow<String> for ParamKey {
    fn borrow(&self) -> &String {
        &self.name
    }
}

impl std::ops::Deref for ParamKey {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for ParamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}
