#pragma once
// Paged KV-cache bookkeeping: fixed-size blocks, a free list, reference counts, per-sequence block tables,
// copy-on-write forks, and prefix caching by a chained hash of each full block's tokens (verified against
// the stored tokens on a hit) with LRU eviction of cached blocks nobody references.
#include <cstddef>
#include <cstdint>
#include <list>
#include <unordered_map>
#include <utility>
#include <vector>

class BlockManager {
 public:
  using Copy = std::pair<int32_t, int32_t>;  // (source block, destination block) KV copies to perform

  BlockManager(int32_t num_blocks, int32_t block_size, bool prefix_caching);

  bool can_allocate(const std::vector<int32_t>& tokens) const;
  // Blocks for a new sequence's prompt; returns how many leading tokens already have cached KV.
  int64_t allocate(int64_t seq, const std::vector<int32_t>& tokens);
  bool can_append(int64_t seq) const;
  // Room for one more token at the end of `seq`; returns its slot.
  int64_t append(int64_t seq, int32_t token);
  std::vector<Copy> fork(int64_t parent, int64_t child);
  // The first n tokens of `seq` now have KV in the cache: its full blocks among them may be shared.
  void mark_computed(int64_t seq, int64_t n);
  void free(int64_t seq);
  void reset_prefix_cache();

  const std::vector<int32_t>& block_table(int64_t seq) const;
  int64_t num_tokens(int64_t seq) const;
  int64_t slot(int64_t seq, int64_t position) const;
  bool has(int64_t seq) const { return seqs_.count(seq) != 0; }

  int32_t num_blocks() const { return static_cast<int32_t>(blocks_.size()); }
  int32_t block_size() const { return block_size_; }
  int32_t num_free() const { return static_cast<int32_t>(free_.size() + lru_.size()); }
  int32_t num_cached_free() const { return static_cast<int32_t>(lru_.size()); }
  int32_t ref_count(int32_t block) const { return blocks_.at(block).refs; }
  int64_t hit_tokens() const { return hit_tokens_; }
  int64_t queried_tokens() const { return queried_tokens_; }

 private:
  struct Block {
    int32_t refs = 0;
    bool hashed = false;
    uint64_t hash = 0;
    std::vector<int32_t> tokens;            // the tokens whose KV it holds (verified on a cache hit)
    std::list<int32_t>::iterator lru_pos;   // valid while in lru_
  };
  struct Seq {
    std::vector<int32_t> table;
    std::vector<int32_t> tokens;
  };

  int32_t take_block();
  void release(int32_t block);
  void seal(Seq& s, size_t index);  // register a block that just became full in the prefix cache
  uint64_t chain_hash(uint64_t parent, const int32_t* tokens) const;
  Seq& seq(int64_t id);
  const Seq& seq(int64_t id) const;

  int32_t block_size_;
  bool prefix_caching_;
  std::vector<Block> blocks_;
  std::vector<int32_t> free_;                       // never-cached free blocks (a stack)
  std::list<int32_t> lru_;                          // cached blocks with refs == 0, oldest first
  std::unordered_map<uint64_t, int32_t> cache_;     // chained hash -> block
  std::unordered_map<int64_t, Seq> seqs_;
  int64_t hit_tokens_ = 0, queried_tokens_ = 0;
};
