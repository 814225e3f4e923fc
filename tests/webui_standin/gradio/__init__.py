"""Stand-in of gradio 3.41.2 (the version AUTOMATIC1111 v1.10.1 pins) for the components, layouts
and events the DreamBooth LoRA tab uses. Constructors accept exactly gradio 3.41.2's parameters
(transcribed from its signatures) and refuse any other, where gradio would only warn; the blocks
form a tree under the ``Blocks`` being built and events are recorded as dependencies (fn, inputs,
outputs) that a test can call. Test support only, not gradio."""

COMMON = ("render", "elem_id", "elem_classes", "visible")
# name → (positional parameters, keyword parameters, events) of gradio 3.41.2's constructors.
SIGNATURES = {
    "Slider": (("minimum", "maximum", "value"), ("step", "label", "info", "every", "show_label", "container", "scale",
               "min_width", "interactive", "randomize"), ("change", "input", "release")),
    "Number": (("value",), ("label", "info", "every", "show_label", "container", "scale", "min_width", "interactive",
               "precision", "minimum", "maximum", "step"), ("change", "input", "submit", "blur", "focus")),
    "Checkbox": (("value",), ("label", "info", "every", "show_label", "container", "scale", "min_width",
                 "interactive"), ("change", "input", "select")),
    "Dropdown": (("choices",), ("value", "type", "multiselect", "allow_custom_value", "max_choices", "label", "info",
                 "every", "show_label", "container", "scale", "min_width", "interactive"),
                 ("change", "input", "select", "focus", "blur")),
    "Textbox": (("value",), ("lines", "max_lines", "placeholder", "label", "info", "every", "show_label", "container",
                "scale", "min_width", "interactive", "autofocus", "type", "text_align", "rtl", "show_copy_button"),
                ("change", "input", "submit", "blur", "select", "focus")),
    "Button": (("value",), ("variant", "size", "icon", "link", "interactive", "scale", "min_width"), ("click",)),
    "Image": (("value",), ("shape", "height", "width", "image_mode", "invert_colors", "source", "tool", "type",
              "label", "every", "show_label", "show_download_button", "container", "scale", "min_width",
              "interactive", "streaming", "mirror_webcam", "brush_radius", "brush_color", "mask_opacity",
              "show_share_button"), ("change", "edit", "clear", "stream", "upload", "select")),
    "Gallery": (("value",), ("label", "every", "show_label", "container", "scale", "min_width", "columns", "rows",
                "height", "preview", "object_fit", "allow_preview", "show_share_button", "show_download_button"),
                ("select",)),
    "Markdown": (("value",), ("rtl", "latex_delimiters"), ("change",)),
    "HTML": (("value",), ("label", "every", "show_label"), ("change",)),
    "JSON": (("value",), ("label", "every", "show_label", "container", "scale", "min_width"), ("change",)),
    "Row": ((), ("variant", "equal_height"), ()),
    "Column": ((), ("scale", "min_width", "variant"), ()),
    "Tabs": ((), ("selected",), ("change", "select")),
    "Tab": (("label",), ("id",), ("select",)),
    "Group": ((), (), ()),
    "Box": ((), (), ()),
    "Accordion": (("label",), ("open",), ()),
    "Blocks": (("theme", "analytics_enabled", "mode", "title", "css"), (), ("load",)),
}
EVENT_KEYWORDS = ("api_name", "status_tracker", "scroll_to_output", "show_progress", "queue", "batch", "max_batch_size",
                  "preprocess", "postprocess", "cancels", "every", "_js")
LAYOUTS = {"Row", "Column", "Tabs", "Tab", "Group", "Box", "Accordion", "Blocks"}

_stack = []  # open layout blocks, innermost last


class Dependency:
    def __init__(self, trigger, event, fn, inputs, outputs, options):
        self.trigger, self.event, self.fn, self.inputs, self.outputs, self.options = \
            trigger, event, fn, inputs, outputs, options


def _as_list(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [value]


class Block:
    kind = "Block"

    def __init__(self, *args, **kwargs):
        positional, keywords, self.events = SIGNATURES[self.kind]
        if len(args) > len(positional):
            raise TypeError(f"{self.kind}() takes at most {len(positional)} positional arguments")
        params = dict(zip(positional, args))
        for key, value in kwargs.items():
            if key not in positional + keywords + COMMON:
                raise TypeError(f"{self.kind}() got an unexpected keyword argument {key!r} (gradio 3.41.2)")
            if key in params:
                raise TypeError(f"{self.kind}() got multiple values for argument {key!r}")
            params[key] = value
        self.params, self.children, self.parent = params, [], None
        self.elem_id = params.get("elem_id")
        self.value = params.get("value")
        self.root = _stack[0] if _stack else None
        if _stack and params.get("render", True):
            self.parent = _stack[-1]
            _stack[-1].children.append(self)
        if self.root is not None:
            self.root.blocks.append(self)

    def __getattr__(self, name):
        events = SIGNATURES[self.kind][2]
        if name in events:
            return lambda fn, inputs=None, outputs=None, **options: self._listen(name, fn, inputs, outputs, options)
        raise AttributeError(f"{self.kind} has no attribute {name!r} in gradio 3.41.2")

    def _listen(self, event, fn, inputs, outputs, options):
        for key in options:
            if key not in EVENT_KEYWORDS:
                raise TypeError(f"{self.kind}.{event}() got an unexpected keyword argument {key!r}")
        if fn is not None and not callable(fn):
            raise TypeError(f"{self.kind}.{event}(): fn is not callable")
        inputs, outputs = _as_list(inputs), _as_list(outputs)
        for block in inputs + outputs:
            if not isinstance(block, Block) or block.kind in LAYOUTS:
                raise TypeError(f"{self.kind}.{event}(): {block!r} is not a component")
        dependency = Dependency(self, event, fn, inputs, outputs, options)
        (self.root or self).dependencies.append(dependency)
        return dependency

    def __repr__(self):
        return f"<{self.kind} {self.params.get('label') or self.params.get('value') or self.elem_id!r}>"

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


class _Layout(Block):
    def __enter__(self):
        _stack.append(self)
        return self

    def __exit__(self, *exc):
        _stack.pop()
        return False


class Blocks(_Layout):
    kind = "Blocks"

    def __init__(self, *args, **kwargs):
        self.blocks, self.dependencies = [], []
        super().__init__(*args, **kwargs)
        if _stack:  # a Blocks inside another is rendered into it
            self.root = _stack[0]

    def __enter__(self):
        if not _stack:
            self.root = self
        return super().__enter__()


def _component(name, base):
    return type(name, (base,), {"kind": name})


for _name in ("Row", "Column", "Tabs", "Tab", "Group", "Box", "Accordion"):
    globals()[_name] = _component(_name, _Layout)
for _name in ("Slider", "Number", "Checkbox", "Dropdown", "Textbox", "Button", "Image", "Gallery", "Markdown", "HTML",
              "JSON"):
    globals()[_name] = _component(_name, Block)
TabItem = Tab  # noqa: F821  (gradio's alias)


def update(**kwargs):
    """gradio 3.41's ``gr.update``: property changes for an output component."""
    kwargs["__type__"] = "update"
    return kwargs
