# gen.py SRC_KERNELS_DIR DST_DIR
#
# Makes the host-compilable copy of the Hopper kernel that emu.cpp includes:
# copies kernels/ to DST_DIR/kernels, then, in every file fwd_sm90.cu pulls in
# (its #include "..." closure), replaces each inline-PTX statement by calls
# into the emulator, instruction by instruction, and writes DST_DIR/kernels/
# sm90_table.inc from the FA_KERNEL table lines.
#
# Why a small PTX-to-C++ translator rather than per-helper regexes: the
# substitutions are keyed on the PTX leaf instructions themselves (wgmma.*,
# mbarrier.*, cp.async.bulk.tensor, bar.*, setmaxnreg, ...), wherever and
# however they are wrapped, so new helpers, template variants or a persistent
# scheduler that reuse these instructions need no change here. Operands are
# mapped from the asm operand lists (%N -> the C++ expression), so nothing of
# the kernel's own index arithmetic is reused. An instruction the emulator
# does not know stops the build with its file and line, rather than
# compiling into something silently wrong.
import os
import re
import shutil
import sys

ENTRY = 'fwd_sm90.cu'


def die(msg):
    sys.exit('gen.py: ' + msg)


# ---------------------------------------------------------------- source scanning
def skip_string(s, i):
    """s[i] is a quote; returns the index after the closing quote."""
    q = s[i]
    i += 1
    while i < len(s):
        if s[i] == '\\':
            i += 2
            continue
        if s[i] == q:
            return i + 1
        i += 1
    die('unterminated literal')


def find_asm_statements(s):
    """Yields (start, end, body) for every asm(...) outside comments/literals;
    end is just past the closing parenthesis."""
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if s.startswith('//', i):
            j = s.find('\n', i)
            i = n if j < 0 else j
            continue
        if s.startswith('/*', i):
            j = s.find('*/', i)
            i = n if j < 0 else j + 2
            continue
        if c in '"\'':
            i = skip_string(s, i)
            continue
        m = re.compile(r'(?:__asm__|asm)\b').match(s, i)
        if m and (i == 0 or not (s[i - 1].isalnum() or s[i - 1] == '_')):
            j = m.end()
            q = re.compile(r'(?:\s|\\\n|volatile\b|__volatile__\b|inline\b)*').match(s, j)
            j = q.end()
            if j < n and s[j] == '(':
                depth, k = 0, j
                while k < n:
                    ch = s[k]
                    if ch in '"\'':
                        k = skip_string(s, k)
                        continue
                    if ch == '(':
                        depth += 1
                    elif ch == ')':
                        depth -= 1
                        if depth == 0:
                            break
                    k += 1
                yield i, k + 1, s[j + 1:k]
                i = k + 1
                continue
        if c.isalnum() or c == '_':
            m = re.compile(r'\w+').match(s, i)
            i = m.end()
            continue
        i += 1


def split_top(s, seps):
    """Splits s at top-level (outside literals and brackets) separator chars."""
    out, depth, cur, i = [], 0, '', 0
    while i < len(s):
        c = s[i]
        if c in '"\'':
            j = skip_string(s, i)
            cur += s[i:j]
            i = j
            continue
        if c in '([{':
            depth += 1
        elif c in ')]}':
            depth -= 1
        if depth == 0 and c in seps:
            out.append(cur)
            cur = ''
        else:
            cur += c
        i += 1
    out.append(cur)
    return out


def unescape(lit):
    return bytes(lit, 'utf-8').decode('unicode_escape')


def parse_template(t):
    """The template: string literals, possibly with macro parameters (TY)
    between them. Returns the PTX text with each parameter as \\x00NAME\\x00."""
    t = t.replace('\\\n', ' ')
    out, i = '', 0
    while i < len(t):
        c = t[i]
        if c == '"':
            j = skip_string(t, i)
            out += unescape(t[i + 1:j - 1])
            i = j
        elif c.isalpha() or c == '_':
            m = re.compile(r'\w+').match(t, i)
            out += '\x00' + m.group(0) + '\x00'
            i = m.end()
        elif c.isspace():
            i += 1
        else:
            die('unexpected %r in asm template %r' % (c, t))
    return out


def parse_operands(sec):
    ops = []
    for o in split_top(sec.replace('\\\n', ' '), ','):
        o = o.strip()
        if not o:
            continue
        m = re.match(r'(?:\[\w+\]\s*)?"([^"]*)"\s*\((.*)\)\s*$', o, re.S)
        if not m:
            die('cannot parse asm operand %r' % o)
        ops.append((m.group(1), ' '.join(m.group(2).split())))
    return ops


# ---------------------------------------------------------------- PTX -> C++
def cxx_str(text):
    """PTX text with \\x00PARAM\\x00 markers -> a C++ string-literal expression."""
    parts = text.split('\x00')
    out = []
    for k, p in enumerate(parts):
        if k % 2:
            out.append(p)  # a macro parameter that expands to a string literal
        elif p:
            out.append('"%s"' % p.replace('\\', '\\\\').replace('"', '\\"'))
    return ' '.join(out) if out else '""'


LVALUE = re.compile(r'^[A-Za-z_][\w.]*(\s*\[[^\[\]]+\])*$')


class Asm:
    def __init__(self, body, where):
        self.where = where
        secs = split_top(body, ':')
        while len(secs) < 4:
            secs.append('')
        self.text = parse_template(secs[0])
        self.outs = parse_operands(secs[1])
        self.ins = parse_operands(secs[2])
        self.ops = self.outs + self.ins
        self.preds = set()
        self.regs = {}

    def fail(self, msg):
        die('%s: %s\n  in: %s' % (self.where, msg, self.text.replace('\x00', '')))

    def operand(self, tok):
        """C++ rvalue for one PTX scalar operand token."""
        tok = tok.strip()
        m = re.fullmatch(r'%(\d+)', tok)
        if m:
            k = int(m.group(1))
            if k >= len(self.ops):
                self.fail('operand %%%d out of range' % k)
            return '(%s)' % self.ops[k][1]
        if re.fullmatch(r'-?(0x[0-9a-fA-F]+|\d+)', tok):
            return tok
        if tok in self.preds or tok in self.regs:
            return 'r_' + tok
        self.fail('unknown operand %r' % tok)

    def lvalue(self, tok):
        tok = tok.strip()
        m = re.fullmatch(r'%(\d+)', tok)
        if m:
            k = int(m.group(1))
            c = self.ops[k][0]
            if k >= len(self.outs) or not ('=' in c or '+' in c):
                self.fail('%%%d is written but is not an output operand' % k)
            return '(%s)' % self.ops[k][1]
        if tok in self.preds or tok in self.regs:
            return 'r_' + tok
        if tok == '_':
            return None
        self.fail('unknown destination %r' % tok)

    def address(self, tok):
        """[x] or [x+imm] -> C++ expression."""
        tok = tok.strip()
        if not (tok.startswith('[') and tok.endswith(']')):
            self.fail('expected an address, got %r' % tok)
        inner = tok[1:-1].strip()
        m = re.fullmatch(r'(.+?)\s*\+\s*(-?\d+)', inner)
        if m:
            return '(%s + %s)' % (self.operand(m.group(1)), m.group(2))
        return self.operand(inner)

    def vector(self, tok):
        tok = tok.strip()
        if not (tok.startswith('{') and tok.endswith('}')):
            self.fail('expected a vector, got %r' % tok)
        return [t.strip() for t in tok[1:-1].split(',')]

    def operand_ptr(self, tok, ctype):
        """Address of the register operand when it is a plain lvalue (so the
        emulator can re-read it later), else nullptr."""
        m = re.fullmatch(r'%(\d+)', tok.strip())
        if m:
            e = self.ops[int(m.group(1))][1]
            if LVALUE.match(e):
                return '(const %s *)&(%s)' % (ctype, e)
        return 'nullptr'

    # one PTX statement -> C++ statement(s)
    def stmt(self, st):
        guard = ''
        m = re.match(r'@(!?)(\w+)\s+(.*)$', st, re.S)
        if m:
            if m.group(2) not in self.preds:
                self.fail('unknown guard predicate %s' % m.group(2))
            guard = 'if (%sr_%s) ' % (m.group(1), m.group(2))
            st = m.group(3)
        parts = st.split(None, 1)
        mn, rest = parts[0], (parts[1] if len(parts) > 1 else '')
        ops = [o.strip() for o in split_top(rest, ',')] if rest.strip() else []
        MN = cxx_str(mn)
        plain = mn.replace('\x00', '')

        def call(s):
            return guard + s + ';'

        if mn == '.reg':
            ty, names = rest.split(None, 1)
            for nm in names.split(','):
                nm = nm.strip()
                if ty == '.pred':
                    self.preds.add(nm)
                else:
                    self.regs[nm] = ty
            decl = []
            for nm in names.split(','):
                nm = nm.strip()
                decl.append('%s r_%s = 0;' % ('bool' if ty == '.pred' else
                                              'uint64_t' if ty.endswith('64') else 'uint32_t', nm))
            return ' '.join(decl)
        if plain.startswith('setp.'):
            cmpop = {'ne': '!=', 'eq': '==', 'lt': '<', 'le': '<=', 'gt': '>', 'ge': '>='}
            f = plain.split('.')
            if len(f) != 3 or f[1] not in cmpop:
                self.fail('unsupported setp form')
            cast = {'s32': 'int32_t', 'u32': 'uint32_t', 'b32': 'uint32_t', 's64': 'int64_t',
                    'u64': 'uint64_t', 'b64': 'uint64_t', 'f32': 'float'}[f[2]]
            d = self.lvalue(ops[0])
            return call('%s = ((%s)%s %s (%s)%s)' % (d, cast, self.operand(ops[1]), cmpop[f[1]], cast,
                                                     self.operand(ops[2])))
        if plain.startswith('selp.'):
            d = self.lvalue(ops[0])
            return call('%s = %s ? %s : %s' % (d, self.operand(ops[3]), self.operand(ops[1]),
                                               self.operand(ops[2])))
        if plain.startswith('mov.'):
            return call('%s = %s' % (self.lvalue(ops[0]), self.operand(ops[1])))
        if plain.startswith('mbarrier.init'):
            return call('emu_mbarrier_init(%s, %s, %s)' % (MN, self.address(ops[0]), self.operand(ops[1])))
        if plain.startswith('mbarrier.arrive'):
            if 'arrive_drop' in plain:
                self.fail('mbarrier.arrive_drop is not emulated')
            d = self.lvalue(ops[0])
            addr = self.address(ops[1])
            third = self.operand(ops[2]) if len(ops) > 2 else None
            if '.expect_tx' in plain:
                e = 'emu_mbarrier_arrive(%s, %s, 1u, %s)' % (MN, addr, third)
            else:
                e = 'emu_mbarrier_arrive(%s, %s, %s, 0u)' % (MN, addr, third or '1u')
            return call(('%s = %s' % (d, e)) if d else e)
        if plain.startswith('mbarrier.try_wait') or plain.startswith('mbarrier.test_wait'):
            d = self.lvalue(ops[0])
            e = 'emu_mbarrier_wait(%s, %s, (uint64_t)%s)' % (MN, self.address(ops[1]), self.operand(ops[2]))
            return call(('%s = %s' % (d, e)) if d else e)
        if plain.startswith('mbarrier.expect_tx') or plain.startswith('mbarrier.complete_tx'):
            return call('emu_mbarrier_tx(%s, %s, %s)' % (MN, self.address(ops[0]), self.operand(ops[1])))
        if plain.startswith('fence.') or plain.startswith('membar.'):
            return call('emu_fence(%s)' % MN)
        if plain.startswith('prefetch.tensormap'):
            return call('emu_prefetch_tensormap(%s, (uint64_t)%s)' % (MN, self.address(ops[0])))
        if plain.startswith('cp.async.bulk.tensor.'):
            if '.global.shared' in plain:  # store: [map, {coords}], [smem]
                inner = split_top(ops[0].strip()[1:-1], ',')
                coords = self.vector(inner[1])
                return call('{ int32_t c_[] = {%s}; emu_tma_store(%s, (uint64_t)%s, c_, %d, %s); }' % (
                    ', '.join('(int32_t)%s' % self.operand(c) for c in coords), MN, self.operand(inner[0]),
                    len(coords), self.address(ops[1])))
            if len(ops) != 3:
                self.fail('only [dst], [map, {coords}], [mbar] tensor loads are emulated')
            inner = split_top(ops[1].strip()[1:-1], ',')
            coords = self.vector(inner[1])
            return call('{ int32_t c_[] = {%s}; emu_tma_load(%s, %s, (uint64_t)%s, c_, %d, %s); }' % (
                ', '.join('(int32_t)%s' % self.operand(c) for c in coords), MN, self.address(ops[0]),
                self.operand(inner[0]), len(coords), self.address(ops[2])))
        if plain.startswith('cp.async.bulk.commit_group'):
            return call('emu_bulk_commit(%s)' % MN)
        if plain.startswith('cp.async.bulk.wait_group'):
            return call('emu_bulk_wait(%s, %s)' % (MN, self.operand(ops[0])))
        if plain.startswith('setmaxnreg.'):
            return call('emu_setmaxnreg(%s, %s)' % (MN, self.operand(ops[0])))
        if plain.split('.')[0] in ('bar', 'barrier') and ('.sync' in plain or '.arrive' in plain):
            if '.red' in plain:
                self.fail('bar.red is not emulated')
            cnt = self.operand(ops[1]) if len(ops) > 1 else '-1'
            return call('emu_bar(%s, %s, %s)' % (MN, self.operand(ops[0]), cnt))
        if plain.startswith('wgmma.fence'):
            return call('emu_wgmma_fence(%s)' % MN)
        if plain.startswith('wgmma.commit_group'):
            return call('emu_wgmma_commit(%s)' % MN)
        if plain.startswith('wgmma.wait_group'):
            return call('emu_wgmma_wait(%s, %s)' % (MN, self.operand(ops[0])))
        if plain.startswith('wgmma.mma_async'):
            if '.sp' in plain.split('.'):
                self.fail('sparse wgmma is not emulated')
            dvec = self.vector(ops[0])
            dptrs = []
            for t in dvec:
                lv = self.lvalue(t)
                dptrs.append('&%s' % lv)
            a_reg = ops[1].startswith('{')
            if a_reg:
                avec = self.vector(ops[1])
                a_vals = ', '.join('(uint32_t)%s' % self.operand(t) for t in avec)
                a_ptrs = ', '.join(self.operand_ptr(t, 'uint32_t') for t in avec)
                na, desc_a = len(avec), '0'
                rest_ops = ops[2:]
            else:
                a_vals, a_ptrs, na, desc_a = '0', 'nullptr', 0, '(uint64_t)%s' % self.operand(ops[1])
                rest_ops = ops[2:]
            want = 5 if a_reg else 6  # desc-b, scale-d, imm-scale-a, imm-scale-b, [imm-trans-a,] imm-trans-b
            if len(rest_ops) != want:
                self.fail('unexpected wgmma operand count')
            desc_b = '(uint64_t)%s' % self.operand(rest_ops[0])
            scale_d = self.operand(rest_ops[1])
            sa, sb = self.operand(rest_ops[2]), self.operand(rest_ops[3])
            ta = self.operand(rest_ops[4]) if not a_reg else '0'
            tb = self.operand(rest_ops[-1])
            return call('{ float *d_[] = {%s}; uint32_t av_[] = {%s}; const uint32_t *ap_[] = {%s}; '
                        'emu_wgmma_mma_async(%s, d_, %d, %s, av_, ap_, %d, %s, %s, (bool)(%s), %s, %s, %s, %s); }' % (
                            ', '.join(dptrs), a_vals, a_ptrs, MN, len(dptrs), 'true' if a_reg else 'false', na,
                            desc_a, desc_b, scale_d, sa, sb, ta, tb))
        if plain.startswith('ex2.approx'):
            return call('%s = emu_ex2_approx(%s, %s)' % (self.lvalue(ops[0]), MN, self.operand(ops[1])))
        if plain.startswith('tanh.approx'):
            return call('%s = emu_tanh_approx(%s, %s)' % (self.lvalue(ops[0]), MN, self.operand(ops[1])))
        if plain.startswith('elect.sync'):
            dst = split_top(ops[0], '|')
            lane = self.lvalue(dst[0]) if dst[0].strip() != '_' else None
            pred = self.lvalue(dst[1]) if len(dst) > 1 else None
            return call('{ uint32_t l_; bool p_ = emu_elect_sync(%s, (uint32_t)%s, &l_); %s %s }' % (
                MN, self.operand(ops[1]), ('%s = l_;' % lane) if lane else '', ('%s = p_;' % pred) if pred else ''))
        self.fail('PTX instruction %s is not emulated (extend tools/sm90-emu)' % plain)

    def translate(self):
        text = self.text
        if not text.strip():
            # asm volatile("" : "+f"(x) :: "memory"): a compiler-only pin.
            return '(emu_compiler_pin())'
        text = re.sub(r'//[^\n]*', '', text)
        stmts = []
        for chunk in text.split(';'):
            chunk = chunk.strip()
            while chunk[:1] in ('{', '}'):
                chunk = chunk[1:].strip()
            while chunk[-1:] == '}':
                chunk = chunk[:-1].strip()
            if not chunk:
                continue
            if re.match(r'^\w+:', chunk):
                self.fail('labels and branches inside asm are not emulated')
            stmts.append(self.stmt(' '.join(chunk.split())))
        return '([&]() { %s }())' % ' '.join(stmts)


def translate_file(path, rel):
    s = open(path).read()
    out, last, count = [], 0, 0
    for start, end, body in find_asm_statements(s):
        line = s[:start].count('\n') + 1
        rep = Asm(body, '%s:%d' % (rel, line)).translate()
        out.append(s[last:start])
        out.append(rep)
        last = end
        count += 1
    out.append(s[last:])
    t = ''.join(out)
    # extern __shared__ T name[];  -> the emulator's dynamic shared window
    def shared(m):
        ty = re.sub(r'__align__\s*\(\s*\d+\s*\)', '', m.group(1)).strip()
        return '%s *const %s = reinterpret_cast<%s *>(emu_dynamic_smem());' % (ty, m.group(2), ty)
    t = re.sub(r'extern\s+__shared__\s+([^;\[]*?)\b(\w+)\s*\[\s*\]\s*;', shared, t)
    if any(True for _ in find_asm_statements(t)):
        die('%s: inline asm left after translation' % rel)
    open(path, 'w').write(t)
    return count


def include_closure(root, entry):
    seen, todo = [], [entry]
    while todo:
        rel = os.path.normpath(todo.pop())
        if rel in seen:
            continue
        seen.append(rel)
        text = open(os.path.join(root, rel)).read()
        for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, re.M):
            cand = os.path.normpath(os.path.join(os.path.dirname(rel), inc))
            if os.path.exists(os.path.join(root, cand)):
                todo.append(cand)
    return seen


def kernel_table(src_text):
    """FA_KERNEL(...) rows, as build.rs reads them (a line starting with
    FA_KERNEL( ), normalised to 9 fields (older tables had no grid field)."""
    rows = []
    for line in src_text.split('\n'):
        if not line.startswith('FA_KERNEL('):
            continue
        inner = line.strip()[len('FA_KERNEL('):]
        if not inner.endswith(')'):
            die('unterminated FA_KERNEL line: ' + line)
        f = [x.strip() for x in inner[:-1].split(',')]
        if len(f) == 8:
            f.append('FA_GRID_TILES')
        if len(f) != 9:
            die('FA_KERNEL takes 9 fields: ' + line)
        rows.append('EMU_KERNEL(%s)' % ', '.join(f))
    if not rows:
        die('no FA_KERNEL rows in ' + ENTRY)
    return rows


def main():
    if len(sys.argv) != 3:
        die('usage: gen.py SRC_KERNELS_DIR DST_DIR')
    src, dst = sys.argv[1], os.path.join(sys.argv[2], 'kernels')
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    total = 0
    for rel in include_closure(dst, ENTRY):
        total += translate_file(os.path.join(dst, rel), rel)
    if total == 0:
        die('no inline PTX found: is %s still the Hopper kernel?' % ENTRY)
    rows = kernel_table(open(os.path.join(src, ENTRY)).read())
    open(os.path.join(dst, 'sm90_table.inc'), 'w').write('\n'.join(rows) + '\n')
    print('gen.py: %d asm statements translated, %d kernels' % (total, len(rows)))


main()
